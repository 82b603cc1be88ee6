"""GPT2D and sample_grid: cached decoding (sequential and wavefront, its linears through
decode_linear) gives the training forward's logits, both orders sample the same grid for a seed (with
a spatial condition and with classifier-free guidance), any size samples, the condition is used where
it should be and a fresh condition path changes nothing."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastvq
from fastvq.models.gpt2d import GPT2D, position_uniforms, sample_grid
from fastvq.nn.raster_attention import wavefront_schedule
from helpers import assert_close, backend_params, device_of, interpreted

VOCAB = 23
F = 2  # pixels per code of the condition maps here


def model(rows=2, left=2, right=1, n_classes=3, seed=0, cond_channels=0):
    torch.manual_seed(seed)
    return GPT2D(VOCAB, n_layer=2, n_head=2, n_embd=32, rows=rows, left=left, right=right, n_classes=n_classes,
                 cond_channels=cond_channels, cond_factor=F).eval()


def conditioned(seed=0, **kw):
    """A conditioned model whose condition path is switched on (a fresh one outputs zero features)."""
    m = model(seed=seed, cond_channels=3, **kw)
    with torch.no_grad():
        nn.init.normal_(m.cond_encoder.out.weight, std=0.3)
    return m


def cond_map(b, h, w, seed=0):
    return torch.randn(b, 3, h * F, w * F, generator=torch.Generator().manual_seed(seed))


def teacher_forced(m, codes, cls, feats, schedule, step=None):
    """Logits for every code from cached decoding along `schedule` (positions on the w + 1 grid);
    feats: condition features (m.encode_cond) or None; step: the decode step (default m.step)."""
    b, h, w = codes.shape
    cache = m.new_cache(b, w, lag_rows=max(len(s) for s in schedule))
    m.prefill(cls, cache)
    step = step or (lambda tokens, positions, cache: m.step(tokens, positions, cache, feats))
    out = torch.zeros(b, h, w, VOCAB, device=codes.device)
    for positions in schedule:
        tokens = torch.stack([codes[:, i, c - 1] if c else codes[:, i, 0] for i, c in positions], 1)
        logits = step(tokens, positions, cache)
        for t, (i, c) in enumerate(positions):
            if c < w:
                out[:, i, c] = logits[:, t]
    return out


@pytest.mark.parametrize("h, w", [(4, 5), (3, 9), (6, 2)])
def test_cached_decoding_gives_the_forward_logits(h, w):
    m = conditioned()
    g = torch.Generator().manual_seed(h * w)
    codes = torch.randint(0, VOCAB, (2, h, w), generator=g)
    cls = torch.tensor([0, 2])
    cond = cond_map(2, h, w, seed=h)
    with torch.no_grad():
        full = m(codes, cls, cond)
        feats = m.encode_cond(cond)
    sequential = [[(i, c)] for i in range(h) for c in range(w + 1)]
    assert_close(teacher_forced(m, codes, cls, feats, sequential), full, atol=2e-5, rtol=1e-4)
    assert_close(teacher_forced(m, codes, cls, feats, wavefront_schedule(h, w + 1, m.right + 1)), full,
                 atol=2e-5, rtol=1e-4)


# the Triton interpreter is slow: one grid of a smaller size there
@pytest.mark.parametrize("backend, batch, h, w", [
    pytest.param(b.values[0], *((1, 2, 3) if interpreted(b.values[0]) else (3, 4, 6)), marks=b.marks, id=b.id)
    for b in backend_params()])
def test_the_decode_linear_step_equals_the_plain_step(backend, batch, h, w, monkeypatch):
    """GPT2D.step runs its linears through decode_linear (stacked q/k/v, GELU and residuals fused);
    the plain step runs the modules' own nn.Linear layers through forward_cached."""
    monkeypatch.setenv("FASTVQ_BACKEND", backend)
    dev = device_of(backend)
    m = model(n_classes=3).to(dev)
    m.blocks[1].attn.query.bias.data.normal_()  # biases are zero at init: make them count
    m.blocks[0].mlp[0].bias.data.normal_()
    m.free_decode_weights()  # writes through .data bypass the copies' version check
    codes = torch.randint(0, VOCAB, (batch, h, w), generator=torch.Generator().manual_seed(1)).to(dev)
    cls = torch.tensor([0, 1, 3][:batch], device=dev)

    def plain_step(tokens, positions, cache):
        rows_idx = torch.tensor([i for i, _ in positions], device=dev)
        cols_idx = torch.tensor([c for _, c in positions], device=dev)
        x = torch.where((cols_idx == 0)[None, :, None], m.row_start, m.tok_emb(tokens))
        for layer, block in enumerate(m.blocks):
            x = x + block.attn.forward_cached(block.ln1(x), cache, rows_idx, cols_idx, layer)
            x = x + block.mlp(block.ln2(x))
        cache.commit(positions)
        return m.head(m.ln_f(x))

    schedule = wavefront_schedule(h, w + 1, m.right + 1)
    with torch.no_grad():
        plain = teacher_forced(m, codes, cls, None, schedule, step=plain_step)
        fused = teacher_forced(m, codes, cls, None, schedule)
        assert_close(fused, plain, atol=2e-5, rtol=1e-4)
        assert_close(fused, m(codes, cls), atol=2e-5, rtol=1e-4)


class _HostReads(TorchDispatchMode):
    """Records the ops that make a GPU wait for the host: a tensor read as a Python number (.item(),
    bool(), int() all dispatch _local_scalar_dense) and nonzero (its output size)."""
    SYNCS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)

    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNCS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", backend_params(("torch", "cpp")))  # the interpreter reads triton's on the host
def test_a_decode_step_reads_no_tensor_back_to_the_host(backend, monkeypatch):
    """GPT2D.step schedules its positions on the host and checks them there (RasterKVCache.check_step),
    so nothing in the step reads a tensor back: on a GPU each read would sync every step."""
    monkeypatch.setenv("FASTVQ_BACKEND", backend)
    m = conditioned()
    codes = torch.randint(0, VOCAB, (2, 3, 4), generator=torch.Generator().manual_seed(3))
    feats = m.encode_cond(cond_map(2, 3, 4)).detach()
    cache = m.new_cache(2, 4, lag_rows=2)
    m.prefill(None, cache)
    seen = []
    with monkeypatch.context() as patch:
        for name in ("tolist", "item", "cpu"):  # not dispatched ops on a CPU tensor: watched here
            method = getattr(torch.Tensor, name)
            patch.setattr(torch.Tensor, name, lambda t, *a, _m=method, _n=name, **k: seen.append(_n) or _m(t, *a, **k))
        for positions in wavefront_schedule(3, 5, m.right + 1)[:6]:  # row starts, codes, two rows at once
            tokens = torch.stack([codes[:, i, max(c - 1, 0)] for i, c in positions], 1)
            with _HostReads(seen):
                m.step(tokens, positions, cache, feats)
    assert seen == []


def test_training_loss_and_the_condition_matter():
    m = conditioned()
    codes = torch.randint(0, VOCAB, (2, 6, 6))
    cond = cond_map(2, 6, 6)
    logits, loss = m(codes, cond=cond, targets=True)
    assert logits.shape == (2, 6, 6, VOCAB) and loss.ndim == 0
    loss.backward()
    assert m.row_start.grad is not None and m.blocks[0].attn.query.weight.grad is not None
    assert m.cond_encoder.body[0].weight.grad.abs().max() > 0
    with torch.no_grad():
        assert not torch.allclose(m(codes, cond=cond), m(codes))
        changed = cond.clone()
        changed[:, :, 5 * F:, 5 * F:] += 1  # the map under the last code only
        diff = (m(codes, cond=changed) - m(codes, cond=cond)).abs().amax(-1)
    # the encoder is not causal: codes above and to the left of the change see it (it lies below
    # and to the right of them); rows above the encoder's reach do not
    assert diff[:, 5, 5].min() > 0 and diff[:, 4, 4].min() > 0 and diff[:, 3, 3].min() > 0
    assert diff[:, :2].max() == 0


def test_a_fresh_condition_path_changes_nothing_until_trained():
    m = model(cond_channels=3)
    codes = torch.randint(0, VOCAB, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    cls, cond = torch.tensor([1, 3]), cond_map(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(m(codes, cls, cond), m(codes, cls))  # the zero output projection
    m.train()
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        m(codes, cls, cond, targets=True)[1].backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        trained = m(codes, cls, cond)
        assert (trained - m(codes, cls)).abs().max() > 1e-3
        # the decode step's weight copies follow the optimiser's in-place updates
        feats = m.encode_cond(cond)
        cached = teacher_forced(m, codes, cls, feats, wavefront_schedule(3, 5, m.right + 1))
    assert_close(cached, trained, atol=2e-5, rtol=1e-4)


def test_cond_keep_false_rows_get_the_null_condition():
    m = conditioned()
    codes = torch.randint(0, VOCAB, (3, 3, 4), generator=torch.Generator().manual_seed(2))
    cond = cond_map(3, 3, 4)
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        kept = m(codes, cond=cond, cond_keep=keep)
        with_cond, without = m(codes, cond=cond), m(codes)
    assert_close(kept[keep], with_cond[keep], atol=1e-6, rtol=1e-6)
    assert_close(kept[~keep], without[~keep], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(with_cond[1], without[1])


def test_wavefront_and_sequential_sampling_draw_the_same_grid_at_any_size():
    m = model(n_classes=0)
    a = sample_grid(m, 5, 11, batch=2, seed=7, temperature=1.0)  # wider and taller than any training crop here
    b = sample_grid(m, 5, 11, batch=2, seed=7, temperature=1.0, wavefront=False)
    assert a.shape == (2, 5, 11) and torch.equal(a, b)
    assert not torch.equal(a, sample_grid(m, 5, 11, batch=2, seed=8))
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB


@pytest.mark.parametrize("cfg_scale", [None, 2.5])
def test_wavefront_and_sequential_agree_with_a_condition(cfg_scale):
    m = conditioned()
    cls, cond = torch.tensor([0, 2]), cond_map(2, 4, 7, seed=3)
    kw = dict(batch=2, cls=cls, cond=cond, seed=5, cfg_scale=cfg_scale)
    a = sample_grid(m, 4, 7, **kw)
    assert torch.equal(a, sample_grid(m, 4, 7, wavefront=False, **kw))
    assert not torch.equal(a, sample_grid(m, 4, 7, **{**kw, "cond": cond_map(2, 4, 7, seed=4)}))


def test_a_shared_condition_map_broadcasts_over_the_batch():
    m = conditioned()
    cond = cond_map(1, 3, 5)
    assert torch.equal(sample_grid(m, 3, 5, batch=2, cond=cond, seed=1),
                       sample_grid(m, 3, 5, batch=2, cond=cond.expand(2, -1, -1, -1), seed=1))


@pytest.mark.parametrize("n_classes, cond", [(3, True), (0, True), (3, False)])
def test_greedy_sampling_is_the_argmax_of_the_forward(n_classes, cond):
    m = conditioned(n_classes=n_classes) if cond else model(n_classes=n_classes)
    cls = torch.tensor([min(1, n_classes)])
    cond = cond_map(1, 3, 4) if cond else None
    grid = sample_grid(m, 3, 4, cls=cls, cond=cond, temperature=0.0)
    with torch.no_grad():
        logits = m(grid, cls, cond)
    assert torch.equal(logits.argmax(-1), grid)


def _count_step_batches(m, monkeypatch) -> list:
    seen, step = [], m.step
    monkeypatch.setattr(m, "step", lambda tokens, *a, **k: seen.append(tokens.shape[0]) or step(tokens, *a, **k))
    return seen


def test_classifier_free_guidance_runs_one_batch_of_both_halves(monkeypatch):
    m = conditioned()
    cls, cond = torch.tensor([2, 1]), cond_map(2, 3, 5, seed=1)
    seen = _count_step_batches(m, monkeypatch)
    plain = sample_grid(m, 3, 5, batch=2, cls=cls, cond=cond, seed=2)
    assert set(seen) == {2}  # no guidance: the batch is not doubled
    seen.clear()
    guided = {s: sample_grid(m, 3, 5, batch=2, cls=cls, cond=cond, seed=2, cfg_scale=s) for s in (1.0, 0.0, 3.0)}
    assert set(seen) == {4}  # conditional and unconditional rows in one batch
    # u + 1 (c - u) = c: the conditional draw; u + 0 (c - u) = u: the null class and no condition
    assert torch.equal(guided[1.0], plain)
    assert torch.equal(guided[0.0], sample_grid(m, 3, 5, batch=2, seed=2))
    assert not torch.equal(guided[3.0], plain)


def test_greedy_guidance_is_the_argmax_of_the_guided_forward_logits():
    m = conditioned()
    cls, cond, s = torch.tensor([1]), cond_map(1, 3, 4, seed=2), 2.0
    grid = sample_grid(m, 3, 4, cls=cls, cond=cond, cfg_scale=s, temperature=0.0)
    with torch.no_grad():
        c = m(grid, cls, cond)
        u = m(grid, None, cond, cond_keep=torch.tensor([False]))
    assert torch.equal((u + s * (c - u)).argmax(-1), grid)


def test_position_uniforms_depend_only_on_the_position():
    rows_idx, cols_idx = torch.arange(50).repeat_interleave(40), torch.arange(40).repeat(50)
    u = position_uniforms(3, 2, rows_idx, cols_idx)
    assert u.shape == (2, 2000) and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.01
    part = position_uniforms(3, 2, rows_idx[100:103], cols_idx[100:103])
    assert torch.equal(part, u[:, 100:103])
    assert not torch.equal(u[0], u[1])  # batch rows draw differently


def test_sample_grid_row_uniforms_are_the_position_uniforms():
    """sample_grid computes a row's uniforms once as the row enters (a table of lanes + 1 rows): the
    numbers at every position in flight are position_uniforms' own."""
    from fastvq.models.gpt2d import _RowUniforms

    rows, cols, lanes = 9, 7, 3
    table = _RowUniforms(5, 2, cols, lanes, "cpu")
    for first in range(rows - lanes + 1):  # rows first .. first + lanes - 1 in flight
        table.enter([(first + lanes - 1, 0)] if first else [(i, 0) for i in range(lanes)])
        i = torch.arange(first, first + lanes).repeat_interleave(cols)
        j = torch.arange(cols).repeat(lanes)
        assert torch.equal(table.at(i, j), position_uniforms(5, 2, i, j))


def test_step_refuses_positions_that_do_not_match_the_tokens():
    m = model()
    cache = m.new_cache(1, 3)
    m.prefill(None, cache)
    before = cache.k.clone()
    with pytest.raises(ValueError, match="tokens holds 1 tokens a row but positions 2"):
        m.step(torch.zeros(1, 1, dtype=torch.long), [(0, 0), (0, 1)], cache)
    assert torch.equal(cache.k, before)


def test_bad_arguments():
    m = model()
    codes = torch.zeros(1, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="codes must be in"):
        m(torch.full((1, 2, 2), VOCAB))
    with pytest.raises(ValueError, match="cls must be in"):
        m(codes, torch.tensor([4]))
    with pytest.raises(ValueError, match="cond was given but this GPT2D has no condition encoder"):
        m(codes, cond=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="cond was given but this GPT2D has no condition encoder"):
        sample_grid(m, 2, 2, cond=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        sample_grid(m, 0, 3)
    with pytest.raises(TypeError, match="GPT2D"):
        sample_grid(fastvq.GPT(5, 8), 2, 2)
    with pytest.raises(ValueError, match="cfg_scale must be a finite number"):
        sample_grid(m, 2, 2, cfg_scale=float("nan"))

    c = conditioned()
    with pytest.raises(ValueError, match=r"cond must be a \(B=1, cond_channels=3, 2\*2, 2\*2\) map"):
        c(codes, cond=torch.zeros(1, 3, 6, 4))  # the map of another grid
    with pytest.raises(ValueError, match=r"cond must be a \(B=1, cond_channels=3"):
        c(codes, cond=torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"cond must be a \(B, 3, H, W\) condition map"):
        c(codes, cond=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="cond's height and width must be positive multiples of factor 2"):
        c.encode_cond(torch.zeros(1, 3, 5, 4))
    with pytest.raises(ValueError, match="cond_keep must be None or a bool tensor"):
        c(codes, cond=torch.zeros(1, 3, 4, 4), cond_keep=torch.ones(1))
    with pytest.raises(ValueError, match="cond_keep was given without cond"):
        c(codes, cond_keep=torch.ones(1, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"cond must be a \(B=1 or 2, cond_channels=3, 3\*2, 5\*2\)"):
        sample_grid(c, 3, 5, batch=2, cond=torch.zeros(2, 3, 6, 8))  # a map smaller than the grid
    with pytest.raises(ValueError, match="cond must be condition features"):
        cache = c.new_cache(1, 2)
        c.prefill(None, cache)
        c.step(torch.zeros(1, 1, dtype=torch.long), [(0, 0)], cache, torch.zeros(1, 3, 4, 4))  # a raw map
    with pytest.raises(ValueError, match="GPT2D: cond_factor must be an integer >= 1"):
        GPT2D(VOCAB, n_layer=1, n_head=2, n_embd=32, cond_channels=3, cond_factor=0)
    with pytest.raises(ValueError, match="factor must be a power of two"):
        GPT2D(VOCAB, n_layer=1, n_head=2, n_embd=32, cond_channels=3, cond_factor=3)
