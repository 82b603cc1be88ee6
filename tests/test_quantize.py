"""nearest_code and vector_quantize: every backend against the torch reference."""
import pytest
import torch

import fastvq
from fastvq.ops.quantize import KERNELS, nearest_code_reference, vector_quantize
from helpers import assert_close, device_of, interpreted, requires

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# (N, K, D): none a multiple of a block size, plus the degenerate ones (K = 1, D = 1).
SHAPES = [(1, 1, 1), (7, 1, 3), (33, 17, 5), (100, 257, 8), (65, 31, 64), (50, 40, 300), (19, 9, 1024)]
TRITON_SHAPES = [(1, 1, 1), (7, 1, 3), (33, 17, 5), (70, 45, 8), (37, 33, 64), (21, 18, 130)]


def shapes_for(backend):
    return TRITON_SHAPES if interpreted(backend) else SHAPES


def search(x, cb, backend, **kwargs):
    """nearest_code on the backend's device, results back on the CPU for comparison."""
    dev = device_of(backend)
    idx, dist = fastvq.nearest_code(x.to(dev), cb.to(dev), backend=backend, **kwargs)
    return idx.cpu(), dist.cpu()


def exact_sq_dist(x, codebook, idx):
    """||x_i - c_idx_i||^2 in float64: what the chosen code really costs."""
    return (x.double() - codebook.double()[idx]).pow(2).sum(1)


def assert_nearest(x, codebook, idx, dist, metric="l2"):
    """The chosen code is a nearest one (up to fp32 rounding of the expanded form) and the
    returned distance is the distance to it."""
    xd, cd = x.double(), codebook.double()
    if metric == "l2":
        all_d = torch.cdist(xd, cd).pow(2)
        chosen = exact_sq_dist(x, codebook, idx)
        scale = xd.pow(2).sum(1) + cd.pow(2).sum(1).max()
    else:
        xn = xd / xd.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cn = cd / cd.norm(dim=1, keepdim=True).clamp_min(1e-12)
        all_d = 1 - xn @ cn.t()
        chosen = all_d.gather(1, idx[:, None]).squeeze(1)
        scale = torch.full_like(chosen, 2.0)
    tol = 1e-5 * scale + 1e-6
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert ((chosen - all_d.min(1).values) <= tol).all(), "a chosen code is not the nearest"
    assert (dist >= 0).all()
    assert torch.allclose(dist.double(), chosen.clamp_min(0), atol=0, rtol=0) or ((dist.double() - chosen).abs() <= 2 * tol).all()


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_matches_reference_fp32(backend, metric):
    g = torch.Generator().manual_seed(0)
    for n, k, d in shapes_for(backend):
        x = torch.randn(n, d, generator=g)
        cb = torch.randn(k, d, generator=g)
        idx, dist = search(x, cb, backend, metric=metric)
        ref_idx, ref_dist = nearest_code_reference(x, cb, metric)
        assert idx.shape == (n,) and dist.shape == (n,)
        assert_nearest(x, cb, idx, dist, metric)
        # Random data has no near-ties at these sizes: indices agree exactly.
        assert (idx == ref_idx).float().mean() > 0.99, (n, k, d)
        assert_close(dist, ref_dist, atol=1e-4 * (1 + d), rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_fp32(backend, dtype):
    g = torch.Generator().manual_seed(1)
    for n, k, d in shapes_for(backend):
        x = torch.randn(n, d, generator=g).to(dtype)
        cb = torch.randn(k, d, generator=g).to(dtype)
        idx, dist = search(x, cb, backend)
        # The oracle sees the same rounded inputs, upcast: only accumulation order may differ.
        assert_nearest(x.float(), cb.float(), idx, dist)


def test_ties_go_to_lowest_index(backend):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(5, 24, generator=g)
    # Codes 0..4, then the same five again, then again: every nearest code has two copies above it.
    cb = torch.cat([base, base, base, torch.randn(4, 24, generator=g) * 10])
    x = torch.cat([base, base + 0.01 * torch.randn(5, 24, generator=g)])
    idx, dist = search(x, cb, backend)
    assert idx.tolist() == list(range(5)) * 2
    assert (dist[:5] <= 1e-4).all()


def test_tie_across_codebook_tiles(backend):
    # The duplicate sits far beyond any tile size, so the running min must keep the first one.
    d = 16
    cb = torch.randn(300, d, generator=torch.Generator().manual_seed(3)) * 5
    cb[297] = cb[3]
    x = cb[3:4].clone()
    idx, _ = search(x, cb, backend)
    assert idx.item() == 3


def test_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(4)
    dev = device_of(backend)
    x = torch.randn(40, 2 * 37, generator=g).to(dev)[:, ::2]   # strided rows
    cb = torch.randn(37, 23, generator=g).to(dev).t()          # transposed: (23, 37), column-major
    assert not x.is_contiguous() and not cb.is_contiguous()
    idx, dist = fastvq.nearest_code(x, cb, backend=backend)
    idx, dist = idx.cpu(), dist.cpu()
    ref_idx, ref_dist = nearest_code_reference(x.cpu().contiguous(), cb.cpu().contiguous())
    assert torch.equal(idx, ref_idx)
    assert_close(dist, ref_dist, atol=1e-3, rtol=1e-4)


def test_distances_clamped_at_zero(backend):
    # A point equal to a large code: the expanded form cancels to about +-1e-2, must come back as >= 0.
    cb = torch.randn(8, 32, generator=torch.Generator().manual_seed(5)) * 100
    idx, dist = search(cb.clone(), cb, backend)
    assert idx.tolist() == list(range(8))
    assert (dist >= 0).all()


def test_empty_rows(backend):
    idx, dist = search(torch.empty(0, 6), torch.randn(4, 6), backend)
    assert idx.shape == (0,) and idx.dtype == torch.int64
    assert dist.shape == (0,) and dist.dtype == torch.float32


@pytest.mark.parametrize(
    "x, cb, exc, words",
    [
        (torch.randn(4), torch.randn(3, 4), ValueError, "x must be 2-D"),
        (torch.randn(4, 5), torch.randn(3, 4), ValueError, "D=5"),
        (torch.randn(4, 4), torch.randn(3, 4, 1), ValueError, "codebook must be 2-D"),
        (torch.arange(8).view(2, 4), torch.randn(3, 4), TypeError, "x must be float"),
        (torch.randn(2, 4), torch.ones(3, 4, dtype=torch.int32), TypeError, "codebook must be float"),
        (torch.randn(2, 4), torch.randn(0, 4), ValueError, "at least one entry"),
        (torch.randn(2, 4), torch.randn(3, 4, device="meta"), ValueError, "same device"),
        ([[1.0, 2.0]], torch.randn(3, 2), TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_refused_clearly(x, cb, exc, words):
    with pytest.raises(exc, match=words):
        fastvq.nearest_code(x, cb)


def test_bad_metric_and_backend():
    x, cb = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="metric must be one of"):
        fastvq.nearest_code(x, cb, metric="l1")
    with pytest.raises(ValueError, match="backend must be one of"):
        fastvq.nearest_code(x, cb, backend="cuda")


def test_explicit_backend_never_falls_back(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="triton.*unavailable"):
        fastvq.nearest_code(torch.randn(2, 3), torch.randn(2, 3), backend="triton")
    monkeypatch.setenv("FASTVQ_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="unavailable"):
        fastvq.nearest_code(torch.randn(2, 3), torch.randn(2, 3))


def test_auto_dispatch_rule(monkeypatch):
    ran = []
    for name, kernels in list(KERNELS.items()):  # record which backend's search each call runs
        monkeypatch.setitem(KERNELS, name, kernels._replace(
            search=lambda *args, _name=name, _search=kernels.search: ran.append(_name) or _search(*args)))

    def dispatched(**kwargs):
        ran.clear()
        fastvq.nearest_code(torch.randn(2, 3), torch.randn(4, 3), **kwargs)
        return ran

    monkeypatch.delenv("FASTVQ_BACKEND", raising=False)
    expected = "cpp" if fastvq.available_backends()["cpp"].available else "torch"
    assert dispatched() == [expected]
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    assert dispatched() == ["torch"]
    assert dispatched(backend="auto") == [expected]


def test_available_backends_says_why():
    status = fastvq.available_backends()
    assert set(status) == {"torch", "cpp", "triton"}
    assert status["torch"].available
    for st in status.values():
        assert st.reason  # what it runs on, or why not


@requires("cpp")
def test_cpp_allocates_no_n_by_k_matrix():
    from torch.profiler import ProfilerActivity, profile

    n, k, d = 4096, 2048, 32
    x, cb = torch.randn(n, d), torch.randn(k, d)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fastvq.nearest_code(x, cb, backend="cpp")
    peak = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert peak < 0.05 * n * k * 4, f"peak allocation {peak} bytes"


# ----------------------------------------------------------------------------- vector_quantize

def vq_by_autograd(z, cb, w_commit, w_code):
    """The textbook composition the fused Function must equal (values and gradients)."""
    idx, _ = nearest_code_reference(z.detach(), cb.detach())
    z_q = cb[idx]
    loss = w_commit * (z_q.detach() - z).pow(2).mean() + w_code * (z_q - z.detach()).pow(2).mean()
    return z + (z_q - z).detach(), loss, idx


@pytest.mark.parametrize("weights", [(1.0, 0.25), (0.25, 1.0), (0.25, 0.0)])
def test_vector_quantize_forward_backward(backend, weights):
    g = torch.Generator().manual_seed(6)
    n, k, d = (45, 19, 13) if interpreted(backend) else (301, 67, 37)
    z0, cb0 = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    grad_out = torch.randn(n, d, generator=g)
    results = []
    for fn in (lambda z, cb: vector_quantize(z, cb, commitment_weight=weights[0], codebook_weight=weights[1], backend=backend),
               lambda z, cb: vq_by_autograd(z, cb, *weights)):
        dev = device_of(backend)
        z, cb = z0.to(dev).requires_grad_(), cb0.to(dev).requires_grad_()
        z_q, loss, idx = fn(z, cb)
        ((z_q * grad_out.to(dev)).sum() + 3.0 * loss).backward()
        results.append(tuple(t.detach().cpu() for t in (z_q, loss, idx, z.grad, cb.grad)))
    (zq, loss, idx, gz, gc), (zq_r, loss_r, idx_r, gz_r, gc_r) = results
    assert torch.equal(idx, idx_r)
    assert_close(zq, zq_r)
    assert_close(loss, loss_r)
    assert_close(gz, gz_r)
    assert_close(gc, gc_r)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_vector_quantize_low_precision(dtype):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(64, 24, generator=g).to(dtype).requires_grad_()
    cb = torch.randn(33, 24, generator=g).to(dtype).requires_grad_()
    z_q, loss, idx = vector_quantize(z, cb, commitment_weight=1.0, codebook_weight=0.25)
    assert z_q.dtype == dtype and loss.dtype == torch.float32
    ref = (cb.detach().float()[idx] - z.detach().float()).pow(2).mean() * 1.25
    assert_close(loss.detach(), ref, rtol=2e-3, atol=1e-3)
    loss.backward()
    assert z.grad.dtype == dtype and cb.grad.dtype == dtype
    assert torch.isfinite(z.grad.float()).all() and cb.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- fused epilogues (gather + loss, backward)

# (N, K, D): odd sizes, K = 1, more codes than rows (most unused), few codes (many repeats).
EPILOGUE_SHAPES = [(1, 1, 1), (7, 1, 3), (45, 19, 13), (33, 200, 5), (70, 3, 130)]


def epilogue_inputs(n, k, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype)
    cb = torch.randn(k, d, generator=g).to(dtype)
    idx = torch.randint(0, k, (n,), generator=g)
    if k > 3:
        idx[: n // 2] = 2  # one heavily repeated code
    return z, cb, idx, torch.randn(n, d, generator=g).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_epilogue_matches_torch_reference(fast_backend, dtype):
    gather, backward = KERNELS[fast_backend].gather, KERNELS[fast_backend].backward
    ref_gather, ref_backward = KERNELS["torch"].gather, KERNELS["torch"].backward
    dev = device_of(fast_backend)
    for seed, (n, k, d) in enumerate(EPILOGUE_SHAPES):
        z, cb, idx, grad_out = epilogue_inputs(n, k, d, dtype, seed)
        out, sq = gather(z.to(dev), cb.to(dev), idx.to(dev))
        ref_out, ref_sq = ref_gather(z, cb, idx)
        # The same two roundings as torch's z + (z_q - z): bit-for-bit equal.
        assert out.dtype == dtype and torch.equal(out.cpu(), ref_out), (n, k, d)
        assert sq.dtype == torch.float32
        assert_close(sq.cpu(), ref_sq, atol=1e-5, rtol=1e-5)
        gl = torch.tensor(1.7)
        for go in (grad_out, None):  # None: the loss alone was backpropagated
            gz, gc = backward(None if go is None else go.to(dev), z.to(dev), cb.to(dev), idx.to(dev), gl.to(dev),
                              -0.3, 0.7, True, True)
            ref_gz, ref_gc = ref_backward(go, z, cb, idx, gl, -0.3, 0.7, True, True)
            assert gz.dtype == dtype and gc.dtype == dtype and gc.shape == cb.shape
            assert_close(gz.cpu(), ref_gz)
            assert_close(gc.cpu(), ref_gc)
            unused = torch.bincount(idx, minlength=k) == 0
            assert (gc.cpu()[unused] == 0).all()
        gz, gc = backward(grad_out.to(dev), z.to(dev), cb.to(dev), idx.to(dev), gl.to(dev), -0.3, 0.7, True, False)
        assert gc is None and gz is not None
        gz, gc = backward(grad_out.to(dev), z.to(dev), cb.to(dev), idx.to(dev), gl.to(dev), -0.3, 0.7, False, True)
        assert gz is None and gc is not None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_only", [False, True])
def test_vector_quantize_fused_matches_torch_backend(fast_backend, dtype, loss_only):
    n, k, d = (45, 19, 13) if interpreted(fast_backend) else (301, 67, 37)
    g = torch.Generator().manual_seed(8)
    z0, cb0, grad_out = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g), torch.randn(n, d, generator=g)
    results = []
    for name in (fast_backend, "torch"):
        dev = device_of(name)
        z = z0.to(dev, dtype).requires_grad_()
        cb = cb0.to(dev, dtype).requires_grad_()
        z_q, loss, idx = vector_quantize(z, cb, commitment_weight=1.0, codebook_weight=0.25, backend=name)
        total = 3.0 * loss if loss_only else (z_q.float() * grad_out.to(dev)).sum() + 3.0 * loss
        total.backward()
        results.append([t.detach().cpu() for t in (z_q, loss, idx, z.grad, cb.grad)])
    (zq, loss, idx, gz, gc), (zq_r, loss_r, idx_r, gz_r, gc_r) = results
    assert torch.equal(idx, idx_r) and torch.equal(zq, zq_r)
    assert_close(loss, loss_r)
    assert_close(gz, gz_r)
    assert_close(gc, gc_r)


@requires("cpp")
def test_cpp_fused_vq_is_deterministic():
    g = torch.Generator().manual_seed(9)
    z0, cb0 = torch.randn(20000, 24, generator=g), torch.randn(7, 24, generator=g)  # thousands of rows per code
    runs = []
    for _ in range(2):
        z, cb = z0.clone().requires_grad_(), cb0.clone().requires_grad_()
        z_q, loss, _ = vector_quantize(z, cb, backend="cpp")
        (z_q.sum() + loss).backward()
        runs.append((z_q, loss, z.grad, cb.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@requires("triton")
def test_triton_codebook_grad_deterministic_mode():
    dev = device_of("triton")
    z, cb, idx, grad_out = epilogue_inputs(45, 19, 13, torch.float32, 10)
    gl = torch.tensor(0.9)
    ref = KERNELS["torch"].backward(grad_out, z, cb, idx, gl, -0.5, 0.5, True, True)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        got = KERNELS["triton"].backward(grad_out.to(dev), z.to(dev), cb.to(dev), idx.to(dev), gl.to(dev), -0.5, 0.5,
                                         True, True)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(got, ref):
        assert_close(a.cpu(), b)


@requires("cpp")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpp_vq_forward_is_search_then_gather(dtype):
    cpp = KERNELS["cpp"]
    for seed, (n, k, d) in enumerate(SHAPES + [(1000, 3, 16)]):
        z, cb, _, _ = epilogue_inputs(n, k, d, dtype, seed)
        idx, out, sq = cpp.fused_forward(z, cb)
        ref_idx, _ = cpp.search(z, cb, "l2")
        ref_out, ref_sq = KERNELS["torch"].gather(z, cb, ref_idx)
        assert torch.equal(idx, ref_idx) and torch.equal(out, ref_out), (n, k, d)
        assert_close(sq, ref_sq, atol=1e-5, rtol=1e-5)
