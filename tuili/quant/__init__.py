"""Weight-only quantization: at load time (`--quantization int8`) or ahead of time (`tuili quantize`)."""
from tuili.quant.int8 import prepare_int8, quantize_model, quantize_per_channel, save_quantized

SUPPORTED_QUANTIZATION = ("int8",)
CHECKPOINT_METHODS = {"tuili-int8": "int8"}  # config.json quant_method -> quantization
__all__ = ["prepare_int8", "quantize_model", "quantize_per_channel", "save_quantized", "SUPPORTED_QUANTIZATION",
           "CHECKPOINT_METHODS"]
