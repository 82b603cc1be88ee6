from .quantize import nearest_code, nearest_code_reference, vector_quantize
from .window_attention import sliding_window_attention, sliding_window_decode

__all__ = ["nearest_code", "nearest_code_reference", "vector_quantize", "sliding_window_attention", "sliding_window_decode"]
