"""Weight-only int8 / int4 quantization as module swaps (see quantize.py for the scheme and the saved format)."""

from .experts import QuantizedExperts
from .linear import Int4Linear, Int8Linear
from .quantize import HIGH_PRECISION, measure_drift, quantize_model

__all__ = ["HIGH_PRECISION", "Int4Linear", "Int8Linear", "QuantizedExperts", "measure_drift", "quantize_model"]
