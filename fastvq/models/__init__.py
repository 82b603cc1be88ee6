"""Models built on fastvq's modules: the GPT prior over code indices and its cached sampler."""
from .gpt import GPT, sample_with_past

__all__ = ["GPT", "sample_with_past"]
