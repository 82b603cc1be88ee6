from .attention import SlidingWindowSelfAttention
from .quantize import VectorQuantizer

__all__ = ["VectorQuantizer", "SlidingWindowSelfAttention"]
