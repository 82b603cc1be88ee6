"""pytest-benchmark suite for sample_logits, grouped by (B, V).

  .venv/bin/python -m pytest benchmarks/bench_sampling.py --benchmark-only

Each backend of fastvq.sample_logits (cpp and the torch reference on CPU tensors, triton on CUDA
tensors where there is a GPU) against the plain torch implementation most samplers use: HF's
TopKLogitsWarper then TopPLogitsWarper (topk, a full descending sort for the nucleus, softmax,
torch.multinomial). Codebook-sized vocabularies, a large top-k (a quarter of the vocabulary) and
top_p = 0.9, temperature 0.8: the setting of VQGAN priors. Every case runs on the same logits.
"""
import pytest
import torch

import fastvq
from fastvq import available_backends

VOCABS = [1024, 16384, 65536]
BATCHES = [1, 16]
TEMPERATURE, TOP_P = 0.8, 0.9


def hf_sample(logits, temperature, top_k, top_p, generator):
    """HF generate's TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper -> multinomial."""
    scores = logits.float() / temperature
    kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
    scores = scores.masked_fill(scores < kth, float("-inf"))
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1 - top_p)
    remove_sorted[..., -1:] = False
    scores = scores.masked_fill(remove_sorted.scatter(1, sorted_idx, remove_sorted), float("-inf"))
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


def _device(impl):
    return "cuda" if impl == "fastvq_triton" else "cpu"


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("impl", ["fastvq_cpp", "fastvq_triton", "torch_reference", "hf_sort"])
def test_sample_logits(benchmark, impl, B, V):
    device = _device(impl)
    if impl.startswith("fastvq_"):
        backend = impl.removeprefix("fastvq_")
        status = available_backends()[backend]
        if not status.available or (backend == "triton" and not torch.cuda.is_available()):
            pytest.skip(f"backend {backend} unavailable here: {status.reason}")
    elif impl == "hf_sort" and device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    logits = torch.randn(B, V, generator=torch.Generator().manual_seed(0)).mul_(3).to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    top_k = V // 4
    if impl == "hf_sort":
        def run():
            out = hf_sample(logits, TEMPERATURE, top_k, TOP_P, gen)
            _sync(device)
            return out
    else:
        backend = "torch" if impl == "torch_reference" else impl.removeprefix("fastvq_")

        def run():
            out = fastvq.sample_logits(logits, temperature=TEMPERATURE, top_k=top_k, top_p=TOP_P,
                                       generator=gen, backend=backend)
            _sync(device)
            return out
    benchmark.group = f"sample_logits B{B}-V{V} ({device})"
    benchmark.extra_info.update(B=B, V=V, top_k=top_k, top_p=TOP_P, device=device)
    out = benchmark(run)
    assert out.shape == (B,) and (out >= 0).all() and (out < V).all()
