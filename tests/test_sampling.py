"""sample_logits: statistics against the exact filtered distribution, set membership, ties, per-row
parameters, guidance, the generator contract (same uniforms, same tokens on every backend), dtypes
and argument checks."""
import math

import pytest
import torch

import fastvq
from fastvq.ops.sampling import sampling_probs
from helpers import assert_close, device_of, interpreted

VOCABS = [1, 7, 1000, 1025]  # none a multiple of a block size, plus a single-token vocabulary


def draw(logits, backend, seed=0, **kwargs):
    """sample_logits on the backend's device with a seeded generator there; tokens back on the CPU."""
    dev = device_of(backend)
    kwargs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = fastvq.sample_logits(logits.to(dev), generator=gen, backend=backend, **kwargs)
    assert out.dtype == torch.int64 and out.device.type == dev
    return out.cpu()


def nucleus_ok(logits, tokens, temperature=1.0, top_k=None, top_p=None):
    """Independent check in float64: every token is among the top-k logits, and within top-k the
    probability mass strictly more probable than it is below top_p (it belongs to the nucleus)."""
    x = logits.double()
    V = x.shape[1]
    chosen = x.gather(1, tokens[:, None])
    if top_k is not None and top_k < V:
        kth = x.topk(top_k, dim=1).values[:, -1:]
        if not (chosen >= kth).all():
            return False
    else:
        kth = torch.full_like(chosen, -math.inf)
    if top_p is not None:
        w = torch.where(x >= kth, torch.exp((x - x.max(1, keepdim=True).values) / temperature), 0.0)
        above = torch.where(x > chosen, w, 0.0).sum(1) / w.sum(1)
        return bool((above < top_p + 1e-6).all())
    return True


def tv_bound(support, n, fail_prob=1e-6):
    """Total variation of an n-draw empirical distribution on `support` tokens: its mean is at most
    0.5 * sqrt(support / n) (Cauchy-Schwarz on sum_i sqrt(p_i (1 - p_i) / n)), and one draw moves it
    by at most 1/n, so by McDiarmid it exceeds the mean by sqrt(ln(1/fail_prob) / (2n)) with
    probability below fail_prob."""
    return 0.5 * math.sqrt(support / n) + math.sqrt(math.log(1 / fail_prob) / (2 * n))


# (temperature, top_k, top_p) over an 11-token vocabulary with distinct logits
STAT_CASES = [(1.0, None, None), (0.7, 4, None), (1.3, None, 0.6), (1.0, 6, 0.8), (0.5, 11, 0.95)]


@pytest.mark.parametrize("case", STAT_CASES, ids=lambda c: f"t{c[0]}-k{c[1]}-p{c[2]}")
def test_draws_follow_the_filtered_distribution(backend, case):
    temperature, top_k, top_p = case
    base = torch.tensor([[2.0, -1.0, 0.5, 1.5, 0.0, -0.5, 1.0, 3.0, -2.0, 0.25, 0.75]])
    n = 6000 if interpreted(backend) else 200_000
    tokens = draw(base.expand(n, -1), backend, seed=11, temperature=temperature, top_k=top_k, top_p=top_p)
    exact = sampling_probs(base, temperature=temperature, top_k=top_k, top_p=top_p)[0].double()
    freq = torch.bincount(tokens, minlength=base.shape[1]).double() / n
    support = int((exact > 0).sum())
    assert (freq[exact == 0] == 0).all(), "a token outside the top-k / top-p set was drawn"
    tv = 0.5 * (freq - exact).abs().sum().item()
    assert tv < tv_bound(support, n), (tv, freq, exact)
    # The oracle's distribution really is filtered: top-k and top-p cut where they should.
    expected_support = {(1.0, None, None): 11, (0.7, 4, None): 4, (1.0, 6, 0.8): None}.get(case)
    if expected_support is not None:
        assert support == expected_support


@pytest.mark.parametrize("V", VOCABS)
def test_tokens_stay_in_the_top_k_and_top_p_set(backend, V):
    g = torch.Generator().manual_seed(V)
    rows = (16 if V >= 1000 else 64) if interpreted(backend) else 256
    logits = torch.randn(rows, V, generator=g) * 3
    for temperature, top_k, top_p in [(1.0, 5, None), (0.8, None, 0.5), (1.2, 50, 0.9), (1.0, 1, None), (2.0, None, 0.05)]:
        tokens = draw(logits, backend, seed=1, temperature=temperature, top_k=top_k, top_p=top_p)
        assert tokens.shape == (rows,) and (tokens >= 0).all() and (tokens < V).all()
        assert nucleus_ok(logits, tokens, temperature, top_k, top_p), (temperature, top_k, top_p)
    # top_k = 1 and a tiny top_p are both greedy on distinct logits
    assert torch.equal(draw(logits, backend, top_k=1), logits.argmax(1))
    assert torch.equal(draw(logits, backend, top_p=1e-6), logits.argmax(1))


def test_temperature_zero_is_argmax_with_lowest_index_on_ties(backend):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 2.0], [-1.0, -1.0, -1.0, -1.0, -1.0], [5.0, 1.0, 5.0, 0.0, 0.0]])
    assert draw(logits, backend, temperature=0.0).tolist() == [1, 0, 0]
    assert draw(logits, backend, temperature=0.0, top_k=3, top_p=0.1).tolist() == [1, 0, 0]
    g = torch.Generator().manual_seed(5)
    big = torch.randn(40, 1025, generator=g)
    big[:, 1024] = big.max(1).values + 1  # the maximum sits beyond every block boundary
    big[::2, 3] = big[::2, 1024]          # and on even rows it ties with an early token
    expect = torch.where(torch.arange(40) % 2 == 0, 3, 1024)
    assert torch.equal(draw(big, backend, temperature=0), expect)


def test_ties_at_the_threshold_are_all_kept(backend):
    # top_k=2: the 2nd largest value 4 is shared by tokens 1, 2 and 3, so all of them stay.
    logits = torch.tensor([[5.0, 4.0, 4.0, 4.0, 1.0, 4.0 - 1e-3]])
    exact = sampling_probs(logits, top_k=2)[0]
    assert (exact[:4] > 0).all() and (exact[4:] == 0).all()
    n = 3000 if interpreted(backend) else 20_000
    tokens = draw(logits.expand(n, -1), backend, seed=3, top_k=2)
    assert set(tokens.tolist()) == {0, 1, 2, 3}
    # top_p: token 0 alone has mass 1/(1+2e^-1) ~ 0.58 < 0.6, so the tied pair 1, 2 joins whole.
    logits = torch.tensor([[1.0, 0.0, 0.0, -3.0]])
    exact = sampling_probs(logits, top_p=0.6)[0]
    assert (exact[:3] > 0).all() and exact[3] == 0
    tokens = draw(logits.expand(n, -1), backend, seed=4, top_p=0.6)
    assert set(tokens.tolist()) == {0, 1, 2}


def test_masked_tokens_are_never_drawn(backend):
    logits = torch.full((200, 37), float("-inf"))
    logits[:, [2, 17, 30]] = torch.tensor([0.0, 1.0, -1.0])
    for kwargs in ({}, {"top_k": 10}, {"top_p": 0.99}, {"top_k": 20, "top_p": 0.999, "temperature": 3.0}):
        tokens = draw(logits, backend, seed=7, **kwargs)
        assert set(tokens.tolist()) <= {2, 17, 30}, kwargs


def test_per_row_parameters(backend):
    g = torch.Generator().manual_seed(8)
    rows, V = 24, 1000
    logits = torch.randn(rows, V, generator=g) * 2
    t = torch.rand(rows, generator=g) * 1.5
    t[::5] = 0.0
    k = torch.randint(1, 60, (rows,), generator=g)
    k[::7] = V + 5  # beyond the vocabulary: no top-k
    p = torch.rand(rows, generator=g) * 0.9 + 0.1
    p[::3] = 1.0
    ref = draw(logits, "torch", seed=9, temperature=t, top_k=k, top_p=p)
    got = draw(logits, backend, seed=9, temperature=t, top_k=k, top_p=p)
    assert torch.equal(got, ref)
    # each row as its own scalar call gives the same distribution as the per-row tensor call
    probs = sampling_probs(logits, temperature=t, top_k=k, top_p=p)
    for i in range(rows):
        one = sampling_probs(logits[i:i + 1], temperature=float(t[i]), top_k=int(k[i]), top_p=float(p[i]))
        assert torch.equal(probs[i:i + 1], one)
    assert torch.equal(got[::5], logits[::5].argmax(1))


@pytest.mark.parametrize("V", VOCABS)
def test_backends_agree_on_the_same_uniforms(backend, V):
    g = torch.Generator().manual_seed(100 + V)
    rows = (12 if V >= 1000 else 48) if interpreted(backend) else 200
    logits = torch.randn(rows, V, generator=g) * 2
    for kwargs in ({}, {"top_k": 20}, {"top_p": 0.8, "temperature": 0.6}, {"top_k": 300, "top_p": 0.95, "temperature": 1.5}):
        ref = draw(logits, "torch", seed=21, **kwargs)
        got = draw(logits, backend, seed=21, **kwargs)
        # Only a uniform landing within rounding of a CDF boundary may pick the neighbouring token.
        assert (got == ref).float().mean() >= 0.99, kwargs
        assert nucleus_ok(logits, got, kwargs.get("temperature", 1.0), kwargs.get("top_k"), kwargs.get("top_p"))


def test_long_rows_with_many_ties_agree(backend):
    # Past 16K tokens the cpp radix select takes a wider first digit; logits on a coarse grid put
    # thousands of tokens on every threshold, so the tie rule (all kept) decides the set.
    g = torch.Generator().manual_seed(16)
    rows = 3 if interpreted(backend) else 32
    logits = torch.randint(-40, 40, (rows, 20000), generator=g).float() / 8
    for kwargs in ({"top_k": 5000}, {"top_p": 0.5}, {"top_k": 12000, "top_p": 0.7, "temperature": 0.5}, {"top_k": 1}):
        ref = draw(logits, "torch", seed=8, **kwargs)
        got = draw(logits, backend, seed=8, **kwargs)
        assert (got == ref).float().mean() >= 0.95, kwargs
        assert (sampling_probs(logits, **kwargs).gather(1, got[:, None]) > 0).all(), kwargs
    # top_k = 1 keeps every token tied at the maximum, not just the first
    tied = sampling_probs(logits, top_k=1)
    assert torch.equal((tied > 0).sum(1), (logits == logits.max(1, keepdim=True).values).sum(1))


def test_generator_reproducibility(backend):
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(12))
    a = draw(logits, backend, seed=5, top_k=100, top_p=0.9)
    b = draw(logits, backend, seed=5, top_k=100, top_p=0.9)
    c = draw(logits, backend, seed=6, top_k=100, top_p=0.9)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the uniforms are one torch.rand(rows) from the generator, consumed by every backend alike
    dev = device_of(backend)
    gen = torch.Generator(device=dev).manual_seed(5)
    fastvq.sample_logits(logits.to(dev), generator=gen, backend=backend)
    after = torch.rand(1, generator=gen, device=dev)
    ref_gen = torch.Generator(device=dev).manual_seed(5)
    torch.rand(64, generator=ref_gen, device=dev)
    assert torch.equal(after, torch.rand(1, generator=ref_gen, device=dev))


def test_classifier_free_guidance(backend):
    g = torch.Generator().manual_seed(13)
    pairs, V, s = 16, 1025, 3.0
    cond, uncond = torch.randn(pairs, V, generator=g), torch.randn(pairs, V, generator=g)
    logits = torch.cat([cond, uncond])
    combined = uncond + s * (cond - uncond)
    got = draw(logits, backend, seed=2, cfg_scale=s, top_k=40, top_p=0.9)
    assert got.shape == (pairs,)
    ref = draw(combined, "torch", seed=2, top_k=40, top_p=0.9)
    assert (got == ref).float().mean() >= 0.9
    assert nucleus_ok(combined, got, 1.0, 40, 0.9)
    assert_close(sampling_probs(logits, cfg_scale=s, top_k=40), sampling_probs(combined, top_k=40))
    assert torch.equal(draw(logits, backend, cfg_scale=s, temperature=0), combined.argmax(1))
    # scale 1 is the conditional rows alone; scale 0 the unconditional ones
    assert torch.equal(draw(logits, backend, cfg_scale=1.0, temperature=0), cond.argmax(1))
    assert torch.equal(draw(logits, backend, cfg_scale=0.0, temperature=0), uncond.argmax(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits(backend, dtype):
    g = torch.Generator().manual_seed(14)
    logits = (torch.randn(64, 1000, generator=g) * 3).to(dtype)
    for kwargs in ({"top_k": 30, "top_p": 0.9}, {"temperature": 0}):
        ref = draw(logits.float(), "torch", seed=3, **kwargs)  # the same rounded logits, upcast
        got = draw(logits, backend, seed=3, **kwargs)
        assert (got == ref).float().mean() >= 0.97, kwargs
        assert nucleus_ok(logits.float(), got, 1.0, kwargs.get("top_k"), kwargs.get("top_p"))


def test_non_contiguous_logits(backend):
    base = torch.randn(30, 2 * 700, generator=torch.Generator().manual_seed(15))
    logits = base[:, ::2]
    assert not logits.is_contiguous()
    got = draw(logits, backend, seed=1, top_k=50, top_p=0.9)
    assert torch.equal(got, draw(logits.contiguous(), "torch", seed=1, top_k=50, top_p=0.9))


def test_empty_batch(backend):
    out = draw(torch.empty(0, 9), backend, top_k=3)
    assert out.shape == (0,) and out.dtype == torch.int64


BAD = [
    (dict(logits=[[1.0, 2.0]]), TypeError, "logits"),
    (dict(logits=torch.zeros(3, 4, dtype=torch.int64)), TypeError, "logits"),
    (dict(logits=torch.zeros(4)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 3, 4)), ValueError, "logits"),
    (dict(logits=torch.zeros(2, 0)), ValueError, "logits"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p=torch.tensor([0.5, 0.5, 0.5, -0.1])), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_k=torch.tensor([1.0, 2.0, 3.0, 4.0])), TypeError, "top_k"),
    (dict(top_k=torch.tensor([1, 2, 0, 4])), ValueError, "top_k"),
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=torch.ones(3)), ValueError, "temperature"),
    (dict(temperature=torch.ones(4, 1)), ValueError, "temperature"),
    (dict(logits=torch.zeros(3, 5), cfg_scale=2.0), ValueError, "cfg_scale"),
    (dict(cfg_scale="2"), TypeError, "cfg_scale"),
    (dict(top_k=torch.tensor([1, 2, 3, 4]), cfg_scale=1.5), ValueError, "top_k"),  # needs 2 rows
    (dict(generator=123), TypeError, "generator"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("kwargs, error, name", BAD, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD)])
def test_bad_arguments_are_refused(kwargs, error, name):
    kwargs = dict(kwargs)
    logits = kwargs.pop("logits", torch.zeros(4, 6))
    with pytest.raises(error, match=name):
        fastvq.sample_logits(logits, **kwargs)


def test_explicit_uniforms_draw_what_the_generator_would(backend):
    dev = device_of(backend)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(4)).to(dev)
    g = torch.Generator(device=dev).manual_seed(11)
    want = fastvq.sample_logits(logits, temperature=0.8, top_k=20, top_p=0.9, generator=g, backend=backend)
    r = torch.rand(6, generator=torch.Generator(device=dev).manual_seed(11), device=dev)
    got = fastvq.sample_logits(logits, temperature=0.8, top_k=20, top_p=0.9, uniform=r, backend=backend)
    assert torch.equal(got, want)
    for bad in (r[:3], r.double(), r + 1):
        with pytest.raises(ValueError, match="uniform"):
            fastvq.sample_logits(logits, uniform=bad, backend=backend)
    with pytest.raises(ValueError, match="not both"):
        fastvq.sample_logits(logits, uniform=r, generator=g, backend=backend)
