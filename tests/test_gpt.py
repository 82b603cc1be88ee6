"""fastvq.GPT, KVCache and sample_with_past against taming's minGPT and its sampler, an uncached
recompute loop, and themselves (ring-buffer decode = windowed forward past block_size)."""
import sys
import types

import pytest
import torch

import fastvq
from helpers import backend_params, requires
from fastvq import GPT, KVCache, sample_with_past


def _taming_mingpt():
    """taming's mingpt imports `transformers` only for top_k_top_p_filtering (used by its sampler
    when top_k is given, never by these greedy tests); stub it when absent."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        stub = types.ModuleType("transformers")

        def top_k_top_p_filtering(*args, **kwargs):
            raise AssertionError("the transformers stub was called: these tests use no top-k in taming")

        stub.top_k_top_p_filtering = top_k_top_p_filtering
        sys.modules["transformers"] = stub
    from taming.modules.transformer import mingpt

    return mingpt


mingpt = _taming_mingpt()

VOCAB, BLOCK, LAYERS, HEADS, EMBD = 37, 24, 2, 2, 32

# the auto path on CPU is cpp when the kernel is built; the torch reference is always checked too
BACKENDS = backend_params(("torch", "cpp"))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads, and a 2-thread parallel region on a busy machine
    stalls for whole scheduler slices: one thread keeps this file's runtime steady."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", request.param)
    return request.param


def _taming_gpt(seed=0):
    torch.manual_seed(seed)
    model = mingpt.GPT(VOCAB, BLOCK, n_layer=LAYERS, n_head=HEADS, n_embd=EMBD).eval()
    with torch.no_grad():  # taming starts pos_emb at zero: give positions something to do
        model.pos_emb.normal_(std=0.5)
    return model


def _tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _recompute_greedy(x, model, steps):
    """The uncached reference: run the whole (windowed) sequence again for every token."""
    seq = x
    for _ in range(steps):
        logits, _ = model(seq)
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return seq[:, x.shape[1]:]


# ----------------------------------------------------------------------------- taming's weights

def test_from_mingpt_logits_and_loss_match_taming():
    ref = _taming_gpt()
    idx = _tokens(3, BLOCK)
    targets = _tokens(3, BLOCK, seed=2)
    for source, kwargs in ((ref, {}), (ref.state_dict(), {"n_head": HEADS})):
        model = GPT.from_mingpt(source, **kwargs).eval()
        assert (model.vocab_size, model.block_size, model.n_layer, model.window) == (VOCAB, BLOCK, LAYERS, BLOCK)
        with torch.no_grad():
            logits, loss = model(idx, targets=targets)
            ref_logits, ref_loss = ref(idx, targets=targets)
        torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)


def test_from_mingpt_keeps_the_weights_dtype():
    model = GPT.from_mingpt(_taming_gpt().double())
    assert model.head.weight.dtype == torch.float64 and model.new_cache(1).k.dtype == torch.float64


def test_from_mingpt_prepended_embeddings_match_taming():
    ref = _taming_gpt()
    model = GPT.from_mingpt(ref).eval()
    idx, emb = _tokens(2, 9), torch.randn(2, 4, EMBD)
    with torch.no_grad():
        torch.testing.assert_close(model(idx, embeddings=emb)[0], ref(idx, embeddings=emb)[0], atol=1e-5, rtol=1e-5)


def test_from_mingpt_refuses_what_it_cannot_reproduce():
    ref = _taming_gpt()
    with pytest.raises(ValueError, match="n_head"):
        GPT.from_mingpt(ref.state_dict())
    with pytest.raises(ValueError, match="rope"):
        GPT.from_mingpt(ref, rope=True)
    with pytest.raises(ValueError, match="lower-triangular"):  # taming's n_unmasked > 0 mask
        GPT.from_mingpt(mingpt.GPT(VOCAB, BLOCK, n_layer=1, n_head=HEADS, n_embd=EMBD, n_unmasked=3).state_dict(),
                        n_head=HEADS)


def test_greedy_sample_with_past_equals_taming_and_recompute(backend):
    ref = _taming_gpt()
    model = GPT.from_mingpt(ref).eval()
    x = _tokens(3, 5)
    steps = BLOCK - 5 + 1  # taming's limit: the last token is never fed back
    seen = []
    ours = sample_with_past(x, model, steps, sample_logits=False, callback=seen.append)
    theirs = mingpt.sample_with_past(x, ref, steps, sample_logits=False)
    assert ours.dtype == torch.int64 and ours.shape == (3, steps)
    assert torch.equal(ours, theirs)
    assert torch.equal(ours, _recompute_greedy(x, model, steps))
    assert seen == list(range(steps))
    assert not torch.equal(ours[0], ours[0].roll(1))  # not a degenerate constant sequence


def test_greedy_with_a_window_equals_windowed_recompute():
    model = GPT.from_mingpt(_taming_gpt(), window=6).eval()
    x = _tokens(2, 9)
    ours = sample_with_past(x, model, BLOCK - 9 + 1, sample_logits=False)
    assert torch.equal(ours, _recompute_greedy(x, model, BLOCK - 9 + 1))


# ----------------------------------------------------------------------------- sampling

def test_sampling_is_reproducible_with_a_generator():
    torch.manual_seed(0)
    model = GPT(VOCAB, BLOCK, LAYERS, HEADS, EMBD).eval()
    x = _tokens(4, 3)

    def draw(seed, **kw):
        return sample_with_past(x, model, 15, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)

    first = draw(7)
    assert torch.equal(first, draw(7))
    assert not torch.equal(first, draw(8))
    assert ((0 <= first) & (first < VOCAB)).all()
    filtered = draw(7, top_k=3, top_p=0.9)
    assert torch.equal(filtered, draw(7, top_k=3, top_p=0.9))


def test_top_k_one_is_greedy():
    model = GPT.from_mingpt(_taming_gpt()).eval()
    x = _tokens(2, 4)
    greedy = sample_with_past(x, model, 12, sample_logits=False)
    assert torch.equal(sample_with_past(x, model, 12, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)


def test_top_p_alone_filters_and_int32_prefixes_work():
    """Unlike taming (top_p only together with top_k), top_p applies on its own: a tiny top_p keeps
    only the most probable token, i.e. greedy."""
    model = GPT.from_mingpt(_taming_gpt()).eval()
    x = _tokens(2, 4)
    greedy = sample_with_past(x, model, 12, sample_logits=False)
    assert torch.equal(sample_with_past(x, model, 12, top_p=1e-6, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(sample_with_past(x.int(), model, 12, sample_logits=False), greedy)


def test_cfg_scale_one_follows_the_conditional_half():
    """cfg_scale = 1 gives u + (c - u) = c: greedy tokens are the conditional prefix's own."""
    model = GPT.from_mingpt(_taming_gpt()).eval()
    cond, uncond = _tokens(2, 4), _tokens(2, 4, seed=5)
    guided = sample_with_past(torch.cat((cond, uncond)), model, 10, sample_logits=False, cfg_scale=1.0)
    assert guided.shape == (2, 10)
    assert torch.equal(guided, sample_with_past(cond, model, 10, sample_logits=False))


# ----------------------------------------------------------------------------- ring-buffer cache

def _rope_window_model(window=5):
    torch.manual_seed(3)
    return GPT(VOCAB, BLOCK, LAYERS, HEADS, EMBD, window=window, rope=True).eval()


def test_ring_cache_steps_equal_the_windowed_forward_past_block_size(backend):
    model = _rope_window_model()
    assert model.pos_emb is None
    seq = _tokens(2, 2 * BLOCK + 3)
    with torch.no_grad():
        full, _ = model(seq)
        cache = model.new_cache(2)
        assert cache.slots == model.window
        prefix = 7  # longer than the ring: prefill keeps only the last `window` keys
        got = [model.prefill(seq[:, :prefix], cache)]
        pos = torch.tensor(prefix)
        for i in range(prefix, seq.shape[1]):
            got.append(model.step(seq[:, i:i + 1], cache, pos))
            pos += 1
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


def test_multi_token_steps_with_a_wider_ring(backend):
    model = _rope_window_model()
    seq = _tokens(1, 30)
    with torch.no_grad():
        full, _ = model(seq)
        cache = model.new_cache(1, slots=model.window + 3)  # 4 tokens a step need window + 3
        got = [model.step(seq[:, i:i + 4], cache, i) for i in range(0, 28, 4)]
        got.append(model.step(seq[:, 28:], cache, torch.tensor(28)))
    torch.testing.assert_close(torch.cat(got, dim=1), full, atol=1e-5, rtol=1e-5)


def test_sampling_past_block_size_in_constant_memory(backend):
    model = _rope_window_model()
    x = _tokens(2, 4)
    steps = 3 * BLOCK
    cache = model.new_cache(2)
    before = (cache.k.shape, cache.v.shape, cache.k.data_ptr(), cache.v.data_ptr(), cache.nbytes)
    ours = sample_with_past(x, model, steps, sample_logits=False, cache=cache)
    assert (cache.k.shape, cache.v.shape, cache.k.data_ptr(), cache.v.data_ptr(), cache.nbytes) == before
    assert cache.slots == model.window
    assert ours.shape == (2, steps)
    assert torch.equal(ours, _recompute_greedy(x, model, steps))


def test_kv_cache_layout():
    cache = KVCache(3, 2, 4, 8, 5)
    assert (len(cache), cache.batch_size, cache.slots) == (3, 2, 5)
    assert cache.k.shape == (3, 2, 4, 5, 8) and cache.nbytes == 2 * 3 * 2 * 4 * 5 * 8 * 4
    k1, v1 = cache[1]
    k1.fill_(1.0)
    assert cache.k[1].eq(1).all() and cache.k[0].eq(0).all() and v1.eq(0).all()  # views, not copies
    cache.reset()
    assert cache.k.eq(0).all()
    with pytest.raises(ValueError, match="slots"):
        KVCache(1, 1, 1, 1, 0)
    with pytest.raises(TypeError, match="dtype"):
        KVCache(1, 1, 1, 1, 1, dtype=torch.int64)
    full = GPT(VOCAB, BLOCK, 1, HEADS, EMBD).new_cache(2)
    assert full.slots == BLOCK  # no window: block_size slots


# ----------------------------------------------------------------------------- bad arguments

def test_bad_arguments_are_refused():
    model = GPT.from_mingpt(_taming_gpt()).eval()
    x = _tokens(2, 4)
    with pytest.raises(ValueError, match="steps"):
        sample_with_past(x, model, -1)
    with pytest.raises(ValueError, match="block_size"):
        sample_with_past(_tokens(2, BLOCK + 1), model, 1)
    with pytest.raises(ValueError, match="block_size"):
        sample_with_past(x, model, BLOCK - 4 + 2)
    with pytest.raises(TypeError, match="int64"):
        sample_with_past(x.float(), model, 3)
    with pytest.raises(TypeError, match="int64"):
        model(x.float())
    with pytest.raises(ValueError, match="block_size"):
        model(_tokens(1, BLOCK + 1))
    with pytest.raises(TypeError, match="from_mingpt"):
        sample_with_past(x, mingpt.GPT(VOCAB, BLOCK, n_layer=1, n_head=HEADS, n_embd=EMBD), 3)
    with pytest.raises(ValueError, match="even"):
        sample_with_past(_tokens(3, 4), model, 3, cfg_scale=2.0)
    with pytest.raises(ValueError, match="n_unmasked"):
        GPT(VOCAB, BLOCK, n_unmasked=2)
    cache = model.new_cache(2)
    with torch.no_grad():
        model.prefill(x, cache)
    before = cache.k.clone(), cache.v.clone()
    with pytest.raises(ValueError, match="block_size"):
        model.step(x[:, :1], cache, BLOCK)
    with pytest.raises(ValueError, match="batch_size"):
        model.step(_tokens(3, 1), cache, 4)
    with pytest.raises(TypeError, match="int64"):
        model.step(x[:, :1].float(), cache, 4)
    with pytest.raises(TypeError, match="pos"):
        model.step(x[:, :1], cache, torch.tensor(4.0))
    with pytest.raises(ValueError, match="slots"):  # 2 new tokens need window + 1 slots
        model.step(x[:, :2], cache, 4)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])  # refused calls leave it as it was
    with pytest.raises(ValueError, match="slots"):
        sample_with_past(x, model, 3, cache=model.new_cache(2, slots=BLOCK - 1))
    assert sample_with_past(x, model, 0).shape == (2, 0)


def test_step_is_inference_and_reads_copies_not_parameters():
    # GPT.step reads its decode weights (stacked q/k/v, huge-page copies on CPU), never builds a
    # graph, and follows a parameter change at the next step.
    torch.manual_seed(0)
    model = GPT(50, 16, n_layer=2, n_head=2, n_embd=32).eval()
    idx = torch.randint(0, 50, (3, 2))
    logits = model.step(idx[:, :1], model.new_cache(3), 0)
    assert not logits.requires_grad
    weights = model.decode_weights()
    assert weights.layers[0].attn.qkv_weight.shape == (96, 32)
    assert weights.head.data_ptr() != model.head.weight.data_ptr()
    with torch.no_grad():
        model.head.weight.mul_(2)
    again = model.step(idx[:, :1], model.new_cache(3), 0)
    torch.testing.assert_close(again, 2 * logits)
    model.free_decode_weights()
    torch.testing.assert_close(model.step(idx[:, :1], model.new_cache(3), 0), again)
