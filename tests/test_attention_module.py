"""SlidingWindowSelfAttention against taming's CausalSelfAttention, a dense masked oracle, and itself
(rope shift invariance, ring-buffer decode = full forward)."""
import copy
import sys
import types

import pytest
import torch

import fastvq
from helpers import backend_params, requires
from fastvq.nn import attention as attention_module
from fastvq.nn.attention import SlidingWindowSelfAttention, rotary


def _taming_attention_class():
    """taming's mingpt imports `transformers` only for a sampling helper; stub it when absent."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("transformers")
        stub.top_k_top_p_filtering = lambda *a, **k: None
        sys.modules["transformers"] = stub
    from taming.modules.transformer.mingpt import CausalSelfAttention, GPTConfig

    return CausalSelfAttention, GPTConfig


CausalSelfAttention, GPTConfig = _taming_attention_class()

# the auto path on CPU is cpp when the kernel is built; the torch reference is always checked too
BACKENDS = backend_params(("torch", "cpp"))


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", request.param)
    return request.param


def pair(n_embd=48, n_head=3, block_size=64, window=None, attn_pdrop=0.0, resid_pdrop=0.0, seed=0):
    """A taming CausalSelfAttention and a SlidingWindowSelfAttention with its weights."""
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=1, block_size=block_size, n_embd=n_embd, n_head=n_head,
                    attn_pdrop=attn_pdrop, resid_pdrop=resid_pdrop)
    ref = CausalSelfAttention(cfg)
    ours = SlidingWindowSelfAttention(n_embd, n_head, window or block_size, attn_pdrop, resid_pdrop)
    ours.load_state_dict(ref.state_dict())  # strict: taming's `mask` buffer is accepted and dropped
    return ref, ours


def module(n_embd=48, n_head=3, window=8, rope=False, seed=0, **kw):
    torch.manual_seed(seed)
    return SlidingWindowSelfAttention(n_embd, n_head, window, rope=rope, **kw).eval()


def dense_reference(m, x, start_pos=0):
    """The module's math in float64 with an explicit window mask, from its own weights."""
    m64 = copy.deepcopy(m).double()
    b, t, c = x.shape
    x = x.double()
    q, k, v = (lin(x).view(b, t, m.n_head, m.head_dim).transpose(1, 2) for lin in (m64.query, m64.key, m64.value))
    if m.rope:
        pos = torch.arange(t) + start_pos
        q, k = rotary(q, pos), rotary(k, pos)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    att = (q @ k.transpose(-1, -2) / m.head_dim ** 0.5).masked_fill((j > i) | (j <= i - m.window), float("-inf"))
    y = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
    return m64.proj(y).float()


# ----------------------------------------------------------------------------- taming equivalence

@pytest.mark.parametrize("t,window", [(1, 64), (37, 37), (50, 64), (64, 1000)])
def test_matches_taming_forward_backward(backend, t, window):
    ref, ours = pair(window=window)
    x = torch.randn(2, t, 48)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, _ = ref(x_ref)
    y = ours(x_ours)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=2e-5, rtol=1e-4)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, atol=5e-5, rtol=1e-4, msg=name)


@torch.no_grad()  # as taming's sample_with_past runs; then the decode op serves the steps
def test_return_present_and_layer_past_match_taming_token_by_token(backend, monkeypatch):
    """taming's sample_with_past: a prompt with return_present, then one token at a time with the
    concatenated presents as layer_past (taming masks nothing there, right for one new token)."""
    calls = []
    decode = attention_module.sliding_window_decode
    monkeypatch.setattr(attention_module, "sliding_window_decode", lambda *a, **k: calls.append(1) or decode(*a, **k))
    ref, ours = pair()
    ref.eval(), ours.eval()
    x = torch.randn(2, 20, 48)
    y_ref, present_ref = ref(x[:, :12])
    y, present = ours(x[:, :12], return_present=True)
    assert present.shape == (2, 2, 3, 12, 16)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(present, present_ref)
    past_ref = past = present
    for i in range(12, 20):
        y_ref, p_ref = ref(x[:, i:i + 1], layer_past=past_ref)
        y, p = ours(x[:, i:i + 1], layer_past=past)
        torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(p, p_ref)
        assert p.shape == (2, 2, 3, 1, 16)  # the new token only, as taming returns it
        past_ref, past = torch.cat((past_ref, p_ref), dim=-2), torch.cat((past, p), dim=-2)
    assert len(calls) == 8  # every step went through the decode op


def test_layer_past_gradients_match_taming():
    ref, ours = pair()
    x = torch.randn(1, 9, 48)
    past = torch.randn(2, 1, 3, 8, 16)
    outs = []
    for m in (ref, ours):
        xi, pi = x[:, -1:].clone().requires_grad_(), past.clone().requires_grad_()
        y = m(xi, layer_past=pi)[0]
        y.pow(2).sum().backward()
        outs.append((y, xi.grad, pi.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_training_with_attention_dropout_matches_taming():
    """attn_pdrop > 0 in training takes the masked-softmax path: same dropout draws as taming's."""
    ref, ours = pair(attn_pdrop=0.3, resid_pdrop=0.2)
    ref.train(), ours.train()
    x = torch.randn(2, 30, 48)
    torch.manual_seed(5)
    y_ref, _ = ref(x)
    torch.manual_seed(5)
    y = ours(x)
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    ours.eval()
    assert not torch.allclose(ours(x), y)  # dropout really acted


def test_taming_state_dict_with_unmasked_prefix_is_refused():
    cfg = GPTConfig(vocab_size=1, block_size=16, n_embd=32, n_head=2, attn_pdrop=0.0, resid_pdrop=0.0, n_unmasked=4)
    state = CausalSelfAttention(cfg).state_dict()
    with pytest.raises(ValueError, match="n_unmasked"):
        SlidingWindowSelfAttention(32, 2, 16).load_state_dict(state)
    assert "mask" not in SlidingWindowSelfAttention(32, 2, 16).state_dict()


# ----------------------------------------------------------------------------- the window

@pytest.mark.parametrize("t,window", [(1, 1), (19, 1), (40, 7), (65, 16), (33, 32)])
@pytest.mark.parametrize("rope", [False, True])
def test_windowed_forward_matches_dense_reference(backend, t, window, rope):
    m = module(window=window, rope=rope)
    x = torch.randn(2, t, 48)
    torch.testing.assert_close(m(x), dense_reference(m, x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("split", [3, 10, 30, 40])  # past shorter than, equal to and beyond the window
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("grad", [False, True])  # without gradients the decode op serves when the shapes allow
def test_layer_past_chunks_equal_full_forward(split, rope, grad):
    """Several new tokens with layer_past: causal among themselves, window in absolute positions."""
    m = module(window=10, rope=rope)
    x = torch.randn(2, 41, 48)
    full = m(x)
    with torch.set_grad_enabled(grad):
        y_head, present = m(x[:, :split], return_present=True)
        y_tail, _ = m(x[:, split:], layer_past=present)
    torch.testing.assert_close(torch.cat((y_head, y_tail), 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [4, 100])
def test_rope_is_relative(window):
    m = module(window=window, rope=True)
    x = torch.randn(2, 24, 48)
    y0 = m(x)
    torch.testing.assert_close(m(x, start_pos=1000), y0, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(m(x, start_pos=torch.tensor(37)), y0, atol=2e-5, rtol=1e-4)
    plain = module(window=window, rope=False)  # same seed, same weights
    assert not torch.allclose(plain(x), y0, atol=1e-3)  # the rotation is really applied


def test_rotary_is_complex_rotation_and_inverts():
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    pos = torch.arange(5) * 3 + 2
    half = 4
    theta = pos[:, None].double() * 10000.0 ** (-torch.arange(half).double() / half)
    z = torch.complex(x[..., :half], x[..., half:]) * torch.polar(torch.ones_like(theta), theta)
    torch.testing.assert_close(rotary(x, pos), torch.cat((z.real, z.imag), -1))
    torch.testing.assert_close(rotary(rotary(x, pos), -pos), x)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_forward_and_cached_decode(dtype, tol):
    m = module(window=6, rope=True)
    x = torch.randn(1, 20, 48)
    ref = m(x)
    low = copy.deepcopy(m).to(dtype)
    torch.testing.assert_close(low(x.to(dtype)).float(), ref, atol=tol, rtol=tol)
    cache_k, cache_v = low.new_cache(1)
    assert cache_k.dtype == dtype
    with torch.no_grad():
        steps = [low.forward_cached(x[:, p:p + 1].to(dtype), cache_k, cache_v, p) for p in range(20)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), ref, atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- ring-buffer decode

@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("step,extra_slots", [(1, 0), (1, 5), (3, 2), (4, 7)])
def test_cached_decode_equals_full_forward(backend, rope, step, extra_slots):
    """Token chunks through a ring of window + step - 1 (+ extra) slots, over a sequence ~6x the window."""
    m = module(window=7, rope=rope)
    t = 45
    x = torch.randn(2, t, 48)
    full = m(x)
    cache_k, cache_v = m.new_cache(2, 7 + step - 1 + extra_slots)
    outs = []
    with torch.no_grad():
        for p in range(0, t, step):
            pos = torch.tensor(p) if p % 2 else p  # ints and 0-dim tensors alike
            outs.append(m.forward_cached(x[:, p:p + step], cache_k, cache_v, pos))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("rope", [True, False])
def test_cached_decode_writes_only_the_new_slots(rope):
    # the ring writes happen inside sliding_window_decode_qkv (one cpp pass for fp32 heads of 16)
    m = module(window=5, rope=rope)
    cache_k, cache_v = m.new_cache(1)
    x = torch.randn(1, 1, 48)
    with torch.no_grad():
        m.forward_cached(x, cache_k, cache_v, 12)
        _, present = m(x, return_present=True, start_pos=12)
    written = 12 % 5
    torch.testing.assert_close(cache_k[:, :, written], present[0, :, :, 0])
    torch.testing.assert_close(cache_v[:, :, written], present[1, :, :, 0])
    others = [s for s in range(5) if s != written]
    assert cache_k[:, :, others].abs().sum() == 0 and cache_v[:, :, others].abs().sum() == 0


@requires("triton")
def test_triton_backend_forward_backward_and_decode(monkeypatch):
    """The module on the Triton kernels (the GPU where there is one, else the interpreter) against
    the same module on the torch reference."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = module(window=5, rope=True)
    x = torch.randn(2, 19, 48)
    monkeypatch.setenv("FASTVQ_BACKEND", "torch")
    x_ref = x.clone().requires_grad_()
    ref = m(x_ref)
    ref.sum().backward()
    grads_ref = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    monkeypatch.setenv("FASTVQ_BACKEND", "triton")
    m_dev = m.to(dev)
    x_dev = x.to(dev).requires_grad_()
    y = m_dev(x_dev)
    y.sum().backward()
    torch.testing.assert_close(y.cpu(), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(x_dev.grad.cpu(), x_ref.grad, atol=2e-5, rtol=1e-4)
    for p, g in zip(m_dev.parameters(), grads_ref):
        torch.testing.assert_close(p.grad.cpu(), g, atol=5e-5, rtol=1e-4)
    cache_k, cache_v = m_dev.new_cache(2)
    with torch.no_grad():
        steps = [m_dev.forward_cached(x_dev[:, p:p + 1], cache_k, cache_v, torch.tensor(p, device=dev)) for p in range(19)]
    torch.testing.assert_close(torch.cat(steps, 1).cpu(), ref, atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- bad arguments

@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=50, n_head=3, window=4), "multiple of n_head"),
    (dict(n_embd=48, n_head=0, window=4), "n_head"),
    (dict(n_embd=48, n_head=3, window=0), "window"),
    (dict(n_embd=48, n_head=3, window=2.5), "window"),
    (dict(n_embd=48, n_head=3, window=True), "window"),
    (dict(n_embd=48, n_head=3, window=4, attn_pdrop=1.0), "attn_pdrop"),
    (dict(n_embd=48, n_head=3, window=4, resid_pdrop=-0.1), "resid_pdrop"),
    (dict(n_embd=45, n_head=3, window=4, rope=True), "even head size"),
])
def test_bad_constructor_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SlidingWindowSelfAttention(**kwargs)


def test_bad_forward_args():
    m = module()
    with pytest.raises(ValueError, match=r"x must be \(B, T, n_embd=48\)"):
        m(torch.randn(2, 5, 40))
    with pytest.raises(ValueError, match=r"x must be"):
        m(torch.randn(5, 48))
    with pytest.raises(ValueError, match="layer_past must be"):
        m(torch.randn(2, 1, 48), layer_past=torch.randn(2, 2, 4, 3, 16))
    with pytest.raises(ValueError, match="layer_past must be"):
        m(torch.randn(2, 1, 48), layer_past=torch.randn(3, 2, 3, 3, 16))


def test_bad_cached_args_leave_the_cache_untouched():
    m = module(window=6, rope=True)
    cache_k, cache_v = m.new_cache(2)
    cache_k.normal_(), cache_v.normal_()
    before = cache_k.clone(), cache_v.clone()
    x = torch.randn(2, 1, 48)
    bad = [
        ((torch.randn(2, 2, 48), cache_k, cache_v, 0), ValueError, "window \\+ n - 1 = 7"),
        ((x, cache_k, cache_v[:, :, :5], 0), ValueError, "cache_v has shape"),
        ((x, cache_k[:1], cache_v, 0), ValueError, "cache_k must be"),
        ((x, cache_k, cache_v, -1), ValueError, "pos"),
        ((x, cache_k, cache_v, 1.5), TypeError, "pos"),
        ((x, cache_k, cache_v, torch.tensor([1])), TypeError, "0-dim"),
        ((x, cache_k.double(), cache_v.double(), 0), TypeError, "must match"),
    ]
    for args, err, match in bad:
        with pytest.raises(err, match=match):
            m.forward_cached(*args)
    torch.testing.assert_close(cache_k, before[0])
    torch.testing.assert_close(cache_v, before[1])


def test_exported():
    assert fastvq.SlidingWindowSelfAttention is SlidingWindowSelfAttention
    assert fastvq.nn.SlidingWindowSelfAttention is SlidingWindowSelfAttention
