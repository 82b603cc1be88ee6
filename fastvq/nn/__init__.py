from .attention import SlidingWindowSelfAttention
from .kv_cache import KVCache
from .quantize import VectorQuantizer
from .raster_attention import RasterKVCache, RasterWindowSelfAttention, wavefront_schedule

__all__ = ["VectorQuantizer", "SlidingWindowSelfAttention", "KVCache", "RasterWindowSelfAttention", "RasterKVCache",
           "wavefront_schedule"]
