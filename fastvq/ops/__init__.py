from .quantize import nearest_code, nearest_code_reference, vector_quantize
from .window_attention import sliding_window_attention, sliding_window_decode, sliding_window_decode_qkv
from .sampling import sample_logits, sampling_probs
from .decode_linear import decode_linear, decode_linear_reference

__all__ = ["nearest_code", "nearest_code_reference", "vector_quantize", "sliding_window_attention", "sliding_window_decode", "sample_logits", "sampling_probs",
           "decode_linear", "decode_linear_reference"]
from .raster_window import raster_window_attention
from .rope import axial_rope, rotary
