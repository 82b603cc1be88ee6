from .quantize import nearest_code, nearest_code_reference, vector_quantize

__all__ = ["nearest_code", "nearest_code_reference", "vector_quantize"]
