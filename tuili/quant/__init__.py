"""Weight-only quantization of a loaded model (`--quantization int8`)."""
from tuili.quant.int8 import quantize_model, quantize_per_channel

SUPPORTED_QUANTIZATION = ("int8",)
__all__ = ["quantize_model", "quantize_per_channel", "SUPPORTED_QUANTIZATION"]
