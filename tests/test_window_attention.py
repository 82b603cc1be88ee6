"""sliding_window_attention and sliding_window_decode: every backend against a dense float64 oracle."""
import pytest
import torch
import torch.nn.functional as F

import fastvq
from helpers import BACKENDS, FAST_BACKENDS, assert_close, backend_params, device_of, interpreted, requires, unavailable
from fastvq.ops.window_attention import (sliding_window_attention, sliding_window_attention_backward_reference,
                                         sliding_window_attention_reference, sliding_window_decode,
                                         sliding_window_decode_qkv, sliding_window_decode_reference)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]



# (B, H, H_kv, T, Dh, window): odd T, windows of 1, small, T - 1, T and beyond, GQA, Dh not a
# power of two. The interpreter is slow, so triton gets small shapes that still span several blocks.
SHAPES = [
    (1, 1, 1, 1, 16, 1), (2, 2, 1, 7, 16, 3), (1, 4, 2, 33, 32, 32), (2, 3, 3, 70, 64, 5),
    (1, 2, 2, 70, 40, 70), (1, 6, 2, 129, 24, 200), (1, 2, 1, 300, 64, 37), (1, 1, 1, 40, 256, 9),
]
TRITON_SHAPES = [
    (1, 1, 1, 1, 16, 1), (2, 2, 1, 7, 16, 3), (1, 4, 2, 33, 32, 32), (1, 2, 2, 70, 24, 5),
    (1, 2, 1, 45, 40, 45), (1, 1, 1, 37, 64, 100),
]



def shapes_for(backend):
    return TRITON_SHAPES if backend == "triton" and device_of(backend) == "cpu" else SHAPES


def attend(backend, q, k, v, window, **kwargs):
    """sliding_window_attention on the backend's device, the result (and gradients) back on the CPU."""
    dev = device_of(backend)
    return sliding_window_attention(q.to(dev), k.to(dev), v.to(dev), window, backend=backend, **kwargs).cpu()


def decode_on(backend, q, k_cache, v_cache, pos, window):
    dev = device_of(backend)
    pos = pos.to(dev) if isinstance(pos, torch.Tensor) else pos
    return sliding_window_decode(q.to(dev), k_cache.to(dev), v_cache.to(dev), pos, window, backend=backend).cpu()


def make_inputs(b, h, hk, t, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, n, t, d, generator=g).to(dtype) for n in (h, hk, hk))
    return q, k, v


def dense_attention(q, k, v, window, scale=None, dtype=torch.float64):
    """Textbook masked softmax attention done entirely in `dtype`, differentiable through autograd.
    float64 is the oracle; the inputs' own dtype is the error yardstick for fp16/bf16."""
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    t = q.shape[2]
    i, j = torch.arange(t, device=q.device)[:, None], torch.arange(t, device=q.device)[None, :]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q @ k.transpose(-1, -2) * scale).masked_fill((j > i) | (j <= i - window), float("-inf"))
    return torch.softmax(s, -1) @ v


def dense_oracle(q, k, v, window, scale=None):
    return dense_attention(q, k, v, window, scale)


def same_in_dtype(q, k, v, window):
    return dense_attention(q, k, v, window, dtype=q.dtype)


def with_grads(fn, inputs, grad_out):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def max_err(got, want):
    return (got.double() - want.double()).abs().max().item()


def assert_close_for_dtype(got, want, yardstick, dtype, what):
    """fp32: an absolute bound of a reordered fp32 sum against the float64 oracle. fp16/bf16: the
    project's rule, at most 2x the error of torch doing it in that dtype (helpers.assert_close)."""
    if dtype == torch.float32:
        assert_close(got, want, dtype=dtype, rtol=0.0, atol=2e-5 * max(want.abs().max().item(), 1.0), msg=str(what))
    else:
        assert_close(got, want, dtype=dtype, yardstick=yardstick, msg=str(what))


# ----------------------------------------------------------------------------- forward and backward

@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_matches_dense_oracle(backend, dtype):
    for b, h, hk, t, d, window in shapes_for(backend):
        q, k, v = make_inputs(b, h, hk, t, d, dtype)
        out = attend(backend, q, k, v, window)
        assert out.shape == q.shape and out.dtype == dtype
        yardstick = same_in_dtype(q, k, v, window) if dtype != torch.float32 else None
        assert_close_for_dtype(out, dense_oracle(q, k, v, window), yardstick, dtype, (t, d, window))


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_matches_dense_oracle(backend, dtype):
    for b, h, hk, t, d, window in shapes_for(backend):
        q, k, v = make_inputs(b, h, hk, t, d, dtype, seed=1)
        grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
        got = with_grads(lambda *x: attend(backend, *x, window), (q, k, v), grad_out)
        want = with_grads(lambda *x: dense_oracle(*x, window), (q, k, v), grad_out)
        yard = with_grads(lambda *x: same_in_dtype(*x, window), (q, k, v), grad_out) if dtype != torch.float32 else [None] * 4
        for name, g, w, y in zip(("out", "dq", "dk", "dv"), got, want, yard):
            assert g.dtype == dtype and g.shape == w.shape
            assert_close_for_dtype(g, w, y, dtype, f"{name} {(t, d, window)}")


@requires("cpp")
def test_cpp_reused_blocks_are_fully_overwritten():
    # The C++ kernel takes its big outputs (out, dq) from a cache of freed blocks and writes dq
    # without zeroing it first: poison two freed blocks of that size and every row must still be
    # written. T = 1100 makes them over the cache's 1 MiB floor and spreads the backward over runs
    # whose overflow rows (window 150 reaches 3 blocks back) land in the next run.
    q, k, v = make_inputs(1, 4, 2, 1100, 64, seed=3)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        poisoned = [attend("cpp", q, k, v, 150) for _ in range(2)]
    for t in poisoned:
        t.fill_(float("nan"))
    del poisoned, t
    got = with_grads(lambda *x: attend("cpp", *x, 150), (q, k, v), grad_out)
    want = with_grads(lambda *x: dense_oracle(*x, 150), (q, k, v), grad_out)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close_for_dtype(g, w, None, torch.float32, name)


def test_non_contiguous_inputs(backend):
    # The usual layout: projections give (B, T, H, Dh), attention wants (B, H, T, Dh); k and v are
    # two halves of one (B, T, 2, H_kv, Dh) tensor. The gradient arrives non-contiguous too.
    b, t, h, hk, d, window = 2, 29, 4, 2, 32, 6
    g, dev = torch.Generator().manual_seed(3), device_of(backend)
    q_rows, kv_rows = torch.randn(b, t, h, d, generator=g), torch.randn(b, t, 2, hk, d, generator=g)
    grad_out = torch.randn(b, t, h, d, generator=g).to(dev).transpose(1, 2)

    def run(fn):
        q_leaf, kv_leaf = (x.to(dev, copy=True).requires_grad_() for x in (q_rows, kv_rows))
        q, k, v = q_leaf.transpose(1, 2), kv_leaf[:, :, 0].transpose(1, 2), kv_leaf[:, :, 1].transpose(1, 2)
        assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
        out = fn(q, k, v)
        out.backward(grad_out.to(out.dtype))
        return [x.detach().double().cpu() for x in (out, q_leaf.grad, kv_leaf.grad)]

    got = run(lambda q, k, v: sliding_window_attention(q, k, v, window, backend=backend))
    for g_, w in zip(got, run(lambda q, k, v: dense_oracle(q, k, v, window))):
        torch.testing.assert_close(g_, w, atol=2e-5, rtol=1e-5)


def test_window_one_returns_own_value(backend):
    q, k, v = make_inputs(1, 4, 2, 19, 16)
    out = attend(backend, q, k, v, 1)
    torch.testing.assert_close(out, v.repeat_interleave(2, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [23, 24, 1000])
def test_window_at_least_t_is_causal_sdpa(backend, window):
    q, k, v = make_inputs(2, 2, 2, 23, 32, seed=4)
    out = attend(backend, q, k, v, window)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-5)


def test_custom_scale(backend):
    q, k, v = make_inputs(1, 2, 1, 17, 16, seed=5)
    out = attend(backend, q, k, v, 4, scale=0.7)
    torch.testing.assert_close(out.double(), dense_oracle(q, k, v, 4, scale=0.7), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_never_nan_with_huge_scores(backend, dtype):
    # Scores of order 1e4: a naive exp overflows, and a row whose window holds only masked
    # padding columns would give 0/0. Every row must stay finite, gradients too.
    q, k, v = make_inputs(1, 1, 1, 21, 16, seed=6)
    q, k, v = (q * 100).to(dtype), (k * 100).to(dtype), v.to(dtype)
    q.requires_grad_()
    out = attend(backend, q, k, v, 2)
    out.float().sum().backward()
    assert torch.isfinite(out.float()).all() and torch.isfinite(q.grad.float()).all()


def test_forward_saves_only_row_lse(backend):
    # Besides the inputs and output, autograd may keep O(B*H*T) floats: never a T x T or T x window matrix.
    b, h, t, d, window = 1, 2, 64, 16, 48
    q, k, v = (x.requires_grad_() for x in make_inputs(b, h, h, t, d))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        attend(backend, q, k, v, window)
    assert saved and max(torch.Size(s).numel() for s in saved) <= b * h * t * d
    assert all(torch.Size(s).numel() < b * h * t * window for s in saved if len(s) == 3)


@pytest.mark.parametrize("chunk", [1, 5, 64, 1000])
def test_torch_reference_chunking_is_exact(chunk):
    q, k, v = make_inputs(1, 2, 1, 50, 16, seed=7)
    window = 13
    out, lse = sliding_window_attention_reference(q, k, v, window, 0.25, chunk=chunk)
    dense_out, dense_lse = sliding_window_attention_reference(q, k, v, window, 0.25, chunk=50)
    torch.testing.assert_close(out, dense_out)
    torch.testing.assert_close(lse, dense_lse)
    go = torch.randn_like(out)
    grads = sliding_window_attention_backward_reference(go, q, k, v, out, lse, window, 0.25, chunk=chunk)
    dense = sliding_window_attention_backward_reference(go, q, k, v, dense_out, dense_lse, window, 0.25, chunk=50)
    for a, b in zip(grads, dense):
        torch.testing.assert_close(a, b)


def test_empty_sequence():
    q, k, v = make_inputs(2, 2, 1, 0, 16)
    q.requires_grad_()
    out = sliding_window_attention(q, k, v, 3)
    out.sum().backward()
    assert out.shape == (2, 2, 0, 16) and q.grad.shape == q.shape


# ----------------------------------------------------------------------------- decode on a ring buffer

def write_ring(cache, values, start):
    """Store values (B, Hkv, n, Dh) of absolute positions start.. into slot position % slots."""
    slots = cache.shape[2]
    for i in range(values.shape[2]):
        cache[:, :, (start + i) % slots] = values[:, :, i]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_by_step_equals_full(backend, dtype):
    b, h, hk, t, d, window = 2, 4, 2, 23, 24, 6  # sequence well past the window: the ring wraps
    q, k, v = make_inputs(b, h, hk, t, d, dtype, seed=8)
    full = dense_oracle(q, k, v, window)
    yardstick = same_in_dtype(q, k, v, window) if dtype != torch.float32 else None
    k_cache, v_cache = torch.zeros(b, hk, window, d, dtype=dtype), torch.zeros(b, hk, window, d, dtype=dtype)
    for p in range(t):
        write_ring(k_cache, k[:, :, p:p + 1], p)
        write_ring(v_cache, v[:, :, p:p + 1], p)
        pos = p if p % 2 else torch.tensor(p)  # both kinds of pos
        step = decode_on(backend, q[:, :, p:p + 1], k_cache, v_cache, pos, window)
        assert step.dtype == dtype
        assert_close_for_dtype(step, full[:, :, p:p + 1], None if yardstick is None else yardstick[:, :, p:p + 1], dtype,
                               f"position {p}")


@pytest.mark.parametrize("n, extra_slots, window, heads", [(3, 0, 5, 2), (4, 5, 5, 2), (3, 0, 20, 8)])
def test_decode_chunks_of_queries(backend, n, extra_slots, window, heads):
    # n queries at once need window + n - 1 slots; a larger ring works the same. The last case
    # has more (head, query) rows and more slots than one tile holds.
    b, h, hk, t, d = 1, heads, 1, 26, 16
    q, k, v = make_inputs(b, h, hk, t, d, seed=9)
    full = sliding_window_attention(q, k, v, window, backend="torch")
    slots = window + n - 1 + extra_slots
    k_cache, v_cache = torch.zeros(b, hk, slots, d), torch.zeros(b, hk, slots, d)
    for p in range(0, t, n):
        m = min(n, t - p)
        write_ring(k_cache, k[:, :, p:p + m], p)
        write_ring(v_cache, v[:, :, p:p + m], p)
        out = decode_on(backend, q[:, :, p:p + m], k_cache, v_cache, torch.tensor(p), window)
        torch.testing.assert_close(out, full[:, :, p:p + m], atol=1e-5, rtol=0, msg=f"chunk at {p}")


@pytest.mark.parametrize("d", [16, 24, 64, 128, 144])
@pytest.mark.parametrize("n, pos", [(1, 0), (1, 5), (1, 300), (3, 2), (2, 301)])
def test_decode_against_reference_over_head_sizes(backend, d, n, pos):
    # The cpp op has a direct path for fp32 caches whose head_dim is a multiple of 16 up to 128 and
    # the blocked one for the rest (24, 144): both, with GQA, a window shorter than the ring, a ring
    # that has wrapped (or not yet filled), and caches that are views of larger buffers.
    b, h, hk, window = 2, 4, 2, 37
    slots = window + n - 1 + 3
    g = torch.Generator().manual_seed(d + pos)
    q = torch.randn(b, h, n, d, generator=g)
    k_cache = torch.randn(b, hk, slots + 5, d, generator=g)[:, :, 5:]  # views of larger rings
    v_cache = torch.randn(b, hk, slots + 5, d, generator=g)[:, :, :slots]
    want = sliding_window_decode_reference(q, k_cache, v_cache, pos, window, d ** -0.5)
    got = decode_on(backend, q, k_cache, v_cache, torch.tensor(pos), window)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_decode_step_is_one_graph_for_every_pos():
    # A tensor pos must not be read on the host: torch.compile traces the step once, with no graph
    # break and no recompile as the position advances (the precondition for CUDA-graph capture).
    torch._dynamo.reset()
    graphs = []

    def count_graphs(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    q, k, v = make_inputs(1, 4, 2, 1, 16, seed=12)
    k_cache, v_cache = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    step = torch.compile(lambda q, pos: sliding_window_decode(q, k_cache, v_cache, pos, 8, backend="torch"),
                         fullgraph=True, backend=count_graphs)
    for p in (3, 4, 11, 30):
        want = sliding_window_decode(q, k_cache, v_cache, p, 8, backend="torch")
        torch.testing.assert_close(step(q, torch.tensor(p)), want)
    assert len(graphs) == 1


@requires("triton")
@pytest.mark.parametrize("splits", [1, 2, 3, 5])
def test_triton_decode_merges_any_split_of_the_ring(monkeypatch, splits):
    # 3 tiles of slots cut into 1, 2 (uneven), 3 or 5 pieces (two of them empty): same answer.
    from fastvq.kernels import window_attention as kernels

    monkeypatch.setattr(kernels, "_decode_splits", lambda programs, slot_tiles, device: splits)
    b, h, hk, t, d, window = 1, 2, 1, 60, 16, 40
    q, k, v = make_inputs(b, h, hk, t, d, seed=13)
    full = dense_oracle(q, k, v, window)
    slots = 45 if device_of("triton") == "cpu" else 150  # three tiles of 16 or 64 slots
    k_cache, v_cache = torch.zeros(b, hk, slots, d), torch.zeros(b, hk, slots, d)
    write_ring(k_cache, k[:, :, :57], 0)
    write_ring(v_cache, v[:, :, :57], 0)
    out = decode_on("triton", q[:, :, 54:57], k_cache, v_cache, torch.tensor(54), window)
    torch.testing.assert_close(out.double(), full[:, :, 54:57], atol=1e-5, rtol=0)


def test_decode_ring_too_small_is_refused():
    q, k, v = make_inputs(1, 1, 1, 3, 16)
    cache = torch.zeros(1, 1, 4, 16)
    with pytest.raises(ValueError, match=r"window \+ n - 1 = 6"):
        sliding_window_decode(q, cache, cache, 10, 4)


def test_decode_gradients_come_from_the_torch_backend(monkeypatch):
    q, k, v = make_inputs(1, 2, 1, 1, 16, seed=10)
    cache_k, cache_v = torch.randn(1, 1, 4, 16), torch.randn(1, 1, 4, 16)
    q.requires_grad_()
    monkeypatch.delenv("FASTVQ_BACKEND", raising=False)
    for backend in ("torch", None):  # auto must pick a backend that can differentiate
        q.grad = None
        sliding_window_decode(q, cache_k, cache_v, 9, 4, backend=backend).sum().backward()
        assert q.grad is not None and torch.isfinite(q.grad).all()
    if unavailable("triton") is None:
        with pytest.raises(RuntimeError, match="no backward"):
            decode_on("triton", q, cache_k, cache_v, 9, 4)


# ----------------------------------------------------------------------------- bad input and dispatch

def _qkv(**changes):
    t = dict(q=torch.randn(1, 4, 5, 16), k=torch.randn(1, 2, 5, 16), v=torch.randn(1, 2, 5, 16))
    t.update(changes)
    return t


@pytest.mark.parametrize(
    "inputs, window, exc, words",
    [
        (_qkv(), 0, ValueError, "window must be an int >= 1"),
        (_qkv(), 2.0, TypeError, "window must be an int"),
        (_qkv(), True, TypeError, "window must be an int"),
        (_qkv(q=torch.randn(4, 5, 16)), 2, ValueError, "q must be 4-D"),
        (_qkv(v=torch.randn(1, 2, 5, 8)), 2, ValueError, "v has shape"),
        (_qkv(k=torch.randn(1, 2, 6, 16), v=torch.randn(1, 2, 6, 16)), 2, ValueError, "q has 5 positions but k has 6"),
        (_qkv(k=torch.randn(1, 3, 5, 16), v=torch.randn(1, 3, 5, 16)), 2, ValueError, "multiple of the 3 heads of k"),
        (_qkv(k=torch.randn(2, 2, 5, 16), v=torch.randn(2, 2, 5, 16)), 2, ValueError, "batch"),
        (_qkv(k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8)), 2, ValueError, "head_dim 16 but k has head_dim 8"),
        (_qkv(q=torch.ones(1, 4, 5, 16, dtype=torch.int32)), 2, TypeError, "q must be float32"),
        (_qkv(q=torch.randn(1, 4, 5, 16, dtype=torch.float64)), 2, TypeError, "q must be float32"),
        (_qkv(k=torch.randn(1, 2, 5, 16).half()), 2, TypeError, "k is torch.float16 but q is torch.float32"),
        (_qkv(v=torch.randn(1, 2, 5, 16, device="meta")), 2, ValueError, "same device"),
        (_qkv(k=[[1.0]]), 2, TypeError, "k must be a torch.Tensor"),
    ],
)
def test_bad_input_is_refused_clearly(inputs, window, exc, words):
    with pytest.raises(exc, match=words):
        sliding_window_attention(inputs["q"], inputs["k"], inputs["v"], window)


@pytest.mark.parametrize(
    "pos, exc, words",
    [(-1, ValueError, "pos .* must be >= 0"), (1.5, TypeError, "pos must be an int"),
     (torch.tensor([3]), TypeError, "0-dim"), (torch.tensor(3.0), TypeError, "integer tensor")],
)
def test_decode_bad_pos_is_refused(pos, exc, words):
    q, cache = torch.randn(1, 2, 1, 16), torch.zeros(1, 1, 4, 16)
    with pytest.raises(exc, match=words):
        sliding_window_decode(q, cache, cache, pos, 4)


def test_decode_bad_cache_is_refused():
    q = torch.randn(1, 2, 1, 16)
    with pytest.raises(ValueError, match="v_cache has shape"):
        sliding_window_decode(q, torch.zeros(1, 1, 4, 16), torch.zeros(1, 1, 5, 16), 0, 4)
    with pytest.raises(ValueError, match="k_cache must be 4-D"):
        sliding_window_decode(q, torch.zeros(4, 16), torch.zeros(4, 16), 0, 4)


def test_bad_scale_and_backend():
    t = _qkv()
    with pytest.raises(TypeError, match="scale must be a float"):
        sliding_window_attention(t["q"], t["k"], t["v"], 2, scale="big")
    with pytest.raises(ValueError, match="backend must be one of"):
        sliding_window_attention(t["q"], t["k"], t["v"], 2, backend="cuda")


@requires("triton")
def test_triton_never_touches_keys_outside_the_band():
    # O(T * window) work: the first 16 keys and values are NaN, and 0 * NaN = NaN in any dot that
    # loads them, so rows far past the window must come out finite in every kernel (block sizes <= 64).
    q, k, v = make_inputs(1, 2, 1, 200, 16, seed=11)
    k[:, :, :16] = float("nan")
    v[:, :, :16] = float("nan")
    got = with_grads(lambda *x: attend("triton", *x, 3), (q, k, v), torch.randn(q.shape))
    for name, t in zip(("out", "dq", "dk", "dv"), got):
        assert torch.isfinite(t[:, :, 150:]).all(), name


@requires("triton")
def test_triton_refuses_head_dim_over_256():
    q, k, v = make_inputs(1, 1, 1, 3, 264)
    with pytest.raises(ValueError, match="head_dim up to 256"):
        attend("triton", q, k, v, 2)


def test_public_api():
    assert fastvq.sliding_window_attention is sliding_window_attention
    assert fastvq.sliding_window_decode is sliding_window_decode
    assert fastvq.sliding_window_decode_qkv is sliding_window_decode_qkv


# ----------------------------------------------------------------------------- the fused decode step

def _dense_step_oracle(qkv, k_ring, v_ring, pos, window, scale):
    """decode_qkv built independently, in float64: write the ring by hand, then a dense masked
    softmax over the absolute positions each slot holds."""
    b, n, _, h, d = qkv.shape
    slots = k_ring.shape[2]
    k_ring, v_ring = k_ring.double().clone(), v_ring.double().clone()
    x = qkv.double()
    for i in range(n):
        k_ring[:, :, (pos + i) % slots] = x[:, i, 1]
        v_ring[:, :, (pos + i) % slots] = x[:, i, 2]
    last = pos + n - 1
    held = torch.tensor([last - ((last - s) % slots) for s in range(slots)])
    out = torch.empty(b, n, h, d, dtype=torch.float64)
    for i in range(n):
        t = pos + i
        seen = (held >= 0) & (held <= t) & (held > t - window)
        scores = torch.einsum("bhd,bhsd->bhs", x[:, i, 0], k_ring) * scale
        p = scores.masked_fill(~seen, float("-inf")).softmax(-1)
        out[:, i] = torch.einsum("bhs,bhsd->bhd", p, v_ring)
    return out.reshape(b, n, h * d), k_ring, v_ring


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d, n, pos, window, extra", [
    (16, 1, 0, 5, 0), (64, 1, 9, 5, 0), (24, 3, 7, 6, 1), (32, 2, 40, 9, 4), (144, 1, 3, 8, 0), (128, 4, 100, 16, 0),
])
def test_decode_qkv_against_the_dense_oracle(backend, dtype, d, n, pos, window, extra):
    # fp32 heads of 16..128 take the cpp one-pass kernel; other head sizes and dtypes the ring
    # writes + decode path: every backend must write the same slots and return the same rows.
    b, h = 2, 3
    slots = window + n - 1 + extra
    g = torch.Generator().manual_seed(d * 7 + pos)
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(dtype)
    k_ring = torch.randn(b, h, slots, d, generator=g).to(dtype)
    v_ring = torch.randn(b, h, slots, d, generator=g).to(dtype)
    want, want_k, want_v = _dense_step_oracle(qkv, k_ring, v_ring, pos, window, d ** -0.5)
    dev = device_of(backend)
    k_dev, v_dev = k_ring.to(dev), v_ring.to(dev)
    got = sliding_window_decode_qkv(qkv.to(dev), k_dev, v_dev, pos, window, backend=backend).cpu()
    assert_close(got, want, dtype=dtype, atol={torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype])
    assert torch.equal(k_dev.cpu(), want_k.to(dtype)) and torch.equal(v_dev.cpu(), want_v.to(dtype))


def test_decode_qkv_steps_equal_the_full_forward_and_reuse_the_ring(backend):
    # a sequence 4x the window through a ring of `window` slots, one token a step: the same rows
    # as sliding_window_attention on the whole sequence, and the rings are never reallocated
    b, h, d, t, window = 1, 2, 32, 40, 10
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, t, 3, h, d, generator=g)
    full = sliding_window_attention_reference(*(x.transpose(1, 2) for x in qkv.unbind(2)), window, d ** -0.5)[0]
    dev = device_of(backend)
    k_ring, v_ring = torch.zeros(b, h, window, d, device=dev), torch.zeros(b, h, window, d, device=dev)
    ptrs = (k_ring.data_ptr(), v_ring.data_ptr())
    steps = [sliding_window_decode_qkv(qkv[:, p:p + 1].to(dev), k_ring, v_ring, torch.tensor(p, device=dev), window,
                                       backend=backend).cpu() for p in range(t)]
    torch.testing.assert_close(torch.cat(steps, 1), full.transpose(1, 2).reshape(b, t, h * d), atol=2e-5, rtol=1e-4)
    assert (k_ring.data_ptr(), v_ring.data_ptr()) == ptrs


def test_decode_qkv_refusals_leave_the_rings_as_they_were():
    qkv = torch.randn(1, 2, 3, 2, 16)
    k_ring, v_ring = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    before = k_ring.clone(), v_ring.clone()
    bad = [
        (dict(window=6), ValueError, r"window \+ n - 1 = 7"),          # ring too small for 2 tokens
        (dict(pos=-1), ValueError, "pos"),
        (dict(qkv=torch.randn(1, 2, 2, 2, 16)), ValueError, r"\(B, n, 3, H, Dh\)"),
        (dict(qkv=qkv.double()), TypeError, "float32, float16 or bfloat16"),
        (dict(qkv=qkv.half()), TypeError, "share a dtype"),
        (dict(v_cache=v_ring[:, :1]), ValueError, "k_cache and v_cache must both be"),
        (dict(qkv=qkv.clone().requires_grad_()), RuntimeError, "inference only"),
        (dict(scale="x"), TypeError, "scale"),
    ]
    for change, exc, words in bad:
        args = dict(qkv=qkv, k_cache=k_ring, v_cache=v_ring, pos=0, window=3) | change
        with pytest.raises(exc, match=words):
            sliding_window_decode_qkv(**args)
    assert torch.equal(k_ring, before[0]) and torch.equal(v_ring, before[1])


@requires("cpp")
def test_cpp_empty_cache_gives_the_reused_blocks_back():
    fastvq.empty_cache()
    q = torch.randn(1, 2, 2048, 64, requires_grad=True)  # 1 MiB outputs: large enough to be cached
    out = sliding_window_attention(q, q, q, 64, backend="cpp")
    out.sum().backward()
    del out
    q.grad = None  # dq is a cached block too
    cached = torch.ops.fastvq.window_attention_cached_bytes()
    assert cached >= 2 * q.numel() * 4
    assert fastvq.empty_cache() == cached
    assert torch.ops.fastvq.window_attention_cached_bytes() == 0 and fastvq.empty_cache() == 0
