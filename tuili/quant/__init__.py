"""Weight-only quantization: at load time (`--quantization int8|int4`) or ahead of time (`tuili quantize`)."""
from tuili.quant.int4 import quantize_groupwise
from tuili.quant.int8 import quantize_per_channel
from tuili.quant.model import (METHODS, QuantConfig, prepare_packed, prepare_quantized, quantize_model,
                              save_quantized)

__all__ = ["METHODS", "QuantConfig", "prepare_packed", "prepare_quantized", "quantize_groupwise", "quantize_model",
           "quantize_per_channel", "save_quantized"]
