from .quantize import VectorQuantizer

__all__ = ["VectorQuantizer"]
