"""fastvq: fused kernels for VQGAN-style discrete image models."""
from ._openmp import tune_spin as _tune_spin

_tune_spin()  # before torch loads libgomp: see fastvq/_openmp.py
from ._backend import available_backends  # noqa: E402
from .ops import nearest_code, vector_quantize
from .nn import KVCache, RasterKVCache, RasterWindowSelfAttention, SlidingWindowSelfAttention, VectorQuantizer
from .ops.window_attention import empty_cache, sliding_window_attention, sliding_window_decode, sliding_window_decode_qkv
from .ops.sampling import sample_logits
from .ops.decode_linear import decode_linear
from .ops.raster_window import raster_window_attention, raster_window_decode, raster_window_decode_qkv
from .ops.rope import axial_rope
from .threads import FairThreads
from .models import (GPT, GPT2D, LPIPS, VQGAN, ConditionEncoder, NLayerDiscriminator, VQGANConfig, VQGANLoss,
                     load_taming_vqgan, sample_grid, sample_with_past)
from .models import load_taming_transformer

__version__ = "0.1.0"

__all__ = ["available_backends", "nearest_code", "vector_quantize", "VectorQuantizer", "sliding_window_attention", "sliding_window_decode", "sliding_window_decode_qkv", "empty_cache", "raster_window_attention", "raster_window_decode", "raster_window_decode_qkv", "axial_rope", "FairThreads", "SlidingWindowSelfAttention", "RasterWindowSelfAttention", "RasterKVCache", "sample_logits", "decode_linear", "KVCache", "GPT", "sample_with_past", "GPT2D", "sample_grid", "ConditionEncoder",
           "VQGAN", "VQGANConfig", "VQGANLoss", "LPIPS", "NLayerDiscriminator", "load_taming_vqgan", "load_taming_transformer", "__version__"]
