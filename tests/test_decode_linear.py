"""decode_linear: every backend against an fp64 reference over odd shapes (M, K, N none a multiple
of a tile), bias / residual / GELU, fp16 and bf16 against torch's own error in that dtype, the
GELU's accuracy in its tails, leading dimensions, strided inputs, empty shapes, determinism across
thread counts, and the argument checks."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastvq
from helpers import BACKENDS, FAST_BACKENDS, assert_close, backend_params, device_of, interpreted, requires, unavailable
from fastvq.ops.decode_linear import decode_linear, decode_linear_reference





# (M, K, N): single rows and columns, the tile remainders (M % 4, N % 8, K % 16), the GPT's widths
SHAPES = [(1, 8, 1), (3, 72, 17), (16, 512, 512), (33, 513, 2049), (1, 513, 2049), (16, 72, 2049),
          (3, 8, 512), (33, 72, 17), (5, 1000, 33), (2, 2048, 24)]
# the interpreter runs every program in Python: a subset there
INTERPRETED_SHAPES = [(1, 8, 1), (3, 72, 17), (16, 512, 40), (33, 513, 65), (1, 513, 2049), (2, 2048, 24)]
EPILOGUES = [(False, False, None), (True, False, None), (True, False, "gelu"), (True, True, None), (False, True, "gelu")]


def make(M, K, N, *, bias, residual, dtype=torch.float32, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    lead = (M,) if lead is None else lead
    x = torch.randn(*lead, K, generator=g)
    w = torch.randn(N, K, generator=g) / math.sqrt(max(K, 1))
    b = torch.randn(N, generator=g) if bias else None
    r = torch.randn(*lead, N, generator=g) if residual else None
    return [t.to(dtype) if t is not None else None for t in (x, w, b, r)]


def reference64(x, w, b, r, activation):
    """The exact result of the rounded inputs: fp64, with GELU through erfc so that its negative
    tail keeps full relative accuracy (1 + erf(z) cancels there)."""
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if activation == "gelu":
        y = 0.5 * y * torch.special.erfc(-y / math.sqrt(2))
    return y if r is None else y + r.double()


def run(backend, x, w, b, r, activation):
    dev = device_of(backend)
    to = [t.to(dev) if t is not None else None for t in (x, w, b, r)]
    with torch.no_grad():
        y = decode_linear(to[0], to[1], to[2], residual=to[3], activation=activation, backend=backend)
    assert y.device.type == dev and y.dtype == x.dtype
    return y.cpu()


@pytest.mark.parametrize("backend, shape", [pytest.param(b, s, marks=requires(b)) for b in BACKENDS for s in (INTERPRETED_SHAPES if interpreted(b) else SHAPES)],
                         ids=lambda v: "M{}-K{}-N{}".format(*v) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=lambda e: f"bias{int(e[0])}-res{int(e[1])}-{e[2]}")
def test_fp32_matches_the_reference(backend, shape, epilogue):
    bias, residual, activation = epilogue
    M, K, N = shape
    x, w, b, r = make(M, K, N, bias=bias, residual=residual)
    y = run(backend, x, w, b, r, activation)
    assert y.shape == (M, N)
    ref = reference64(x, w, b, r, activation)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 513, 67), (16, 72, 40), (3, 2048, 9)], ids=lambda s: "M{}-K{}-N{}".format(*s))
def test_low_precision_is_at_most_twice_torchs_error(backend, dtype, shape):
    M, K, N = shape
    x, w, b, r = make(M, K, N, bias=True, residual=True, dtype=dtype, seed=3)
    for activation in (None, "gelu"):
        ref = reference64(x, w, b, r, activation)
        ours = (run(backend, x, w, b, r, activation).double() - ref).abs().max().item()
        torchs = (decode_linear_reference(x, w, b, r, activation).double() - ref).abs().max().item()
        assert ours <= 2 * torchs + 1e-6, (activation, ours, torchs)


@pytest.mark.parametrize("backend", backend_params(FAST_BACKENDS))
def test_gelu_accuracy(backend):
    """GELU over both tails, against the exact v * Phi(v): within fp32 rounding everywhere; the cpp
    backend also keeps its relative accuracy in the negative tail, where v * Phi(v) is tiny and
    1 + erf(v / sqrt 2) cancels (it uses erfc)."""
    v = torch.cat([torch.linspace(-12, 13, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0])])
    y = run(backend, v[:, None], torch.ones(1, 1), None, None, "gelu")[:, 0].double()
    exact = 0.5 * v.double() * torch.special.erfc(-v.double() / math.sqrt(2))
    assert ((y - exact).abs() <= 1e-6 * exact.abs().clamp_min(1)).all()
    if backend == "cpp":
        normal = exact.abs() > 1e-36
        assert ((y - exact).abs() / exact.abs())[normal].max() < 3e-5  # fp32 rounding of z * z in exp(-z * z)


def test_leading_dims_and_strided_inputs(backend):
    x, w, b, r = make(6, 40, 24, bias=True, residual=True, lead=(2, 3), seed=5)
    y = run(backend, x, w, b, r, "gelu")
    assert y.shape == (2, 3, 24)
    torch.testing.assert_close(y.double(), reference64(x, w, b, r, "gelu"), rtol=1e-5, atol=1e-5)
    # transposed / sliced views of the same values
    xt = x.reshape(6, 40).t().contiguous().t()
    wt = torch.cat([w, w], 1)[:, ::2]
    wt.copy_(w)
    rt = r.reshape(6, 24).t().contiguous().t()
    bt = torch.stack([b, b], 1)[:, 0]
    y2 = run(backend, xt, wt, bt, rt, "gelu")
    torch.testing.assert_close(y2, y.reshape(6, 24), rtol=1e-6, atol=1e-6)
    r_before = r.clone()
    run(backend, x, w, b, r, None)
    assert torch.equal(r, r_before), "the residual was written to"


def test_empty_shapes(backend):
    for M, K, N in [(0, 8, 5), (3, 8, 0), (3, 0, 5)]:
        x, w, b, r = make(M, K, N, bias=True, residual=True)
        y = run(backend, x, w, b, r, "gelu")
        assert y.shape == (M, N)
        torch.testing.assert_close(y.double(), reference64(x, w, b, r, "gelu"), rtol=1e-6, atol=1e-6)


@requires("cpp")
def test_cpp_is_the_same_on_any_thread_count():
    x, w, b, r = make(16, 512, 2048, bias=True, residual=True, seed=9)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("cpp", x, w, b, r, "gelu")
        torch.set_num_threads(2)
        two = run("cpp", x, w, b, r, "gelu")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_argument_checks():
    x, w, b, r = make(3, 8, 5, bias=True, residual=True)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., K=8\)"):
        decode_linear(torch.randn(3, 7), w)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        decode_linear(x, w[0])
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        decode_linear(x, w.tolist())
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        decode_linear(x.tolist(), w)
    with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
        decode_linear(x, w, b[:4])
    with pytest.raises(ValueError, match=r"residual must have shape \(3, 5\)"):
        decode_linear(x, w, b, residual=r.t())
    with pytest.raises(TypeError, match="x must have weight's dtype torch.float32, got torch.float16"):
        decode_linear(x.half(), w)
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        decode_linear(x, w, b.double())
    with pytest.raises(TypeError, match="weight must be float32, float16 or bfloat16"):
        decode_linear(x.double(), w.double())
    with pytest.raises(ValueError, match="residual is on meta but weight is on cpu"):
        decode_linear(x, w, b, residual=r.to("meta"))
    with pytest.raises(ValueError, match="activation must be one of"):
        decode_linear(x, w, activation="relu")
    with pytest.raises(ValueError, match="backend must be one of"):
        decode_linear(x, w, backend="cuda")
    with pytest.raises(RuntimeError, match="inference only"):
        decode_linear(x, w.requires_grad_())
    with torch.no_grad():
        assert decode_linear(x, w).shape == (3, 5)
