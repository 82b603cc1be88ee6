"""fastvq: fused kernels for VQGAN-style discrete image models."""
from ._backend import available_backends
from .ops import nearest_code, vector_quantize

__version__ = "0.1.0"

__all__ = ["available_backends", "nearest_code", "vector_quantize", "__version__"]
