from .attention import SlidingWindowSelfAttention
from .kv_cache import KVCache
from .quantize import VectorQuantizer

__all__ = ["VectorQuantizer", "SlidingWindowSelfAttention", "KVCache"]
