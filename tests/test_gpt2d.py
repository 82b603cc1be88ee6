"""GPT2D and sample_grid: cached decoding (sequential and wavefront) gives the training forward's
logits, both orders sample the same grid for a seed, any size samples, the condition is used."""
import pytest
import torch

import fastvq
from fastvq.models.gpt2d import GPT2D, position_uniforms, sample_grid
from fastvq.nn.raster_attention import wavefront_schedule
from helpers import assert_close

VOCAB = 23


def model(rows=2, left=2, right=1, n_classes=3, seed=0):
    torch.manual_seed(seed)
    return GPT2D(VOCAB, n_layer=2, n_head=2, n_embd=32, rows=rows, left=left, right=right, n_classes=n_classes).eval()


def teacher_forced(m, codes, cls, cond, schedule):
    """Logits for every code from cached decoding along `schedule` (positions on the w + 1 grid)."""
    b, h, w = codes.shape
    cache = m.new_cache(b, w, lag_rows=max(len(s) for s in schedule))
    m.prefill(cls, cache)
    out = torch.zeros(b, h, w, VOCAB)
    for positions in schedule:
        tokens = torch.stack([codes[:, i, c - 1] if c else codes[:, i, 0] for i, c in positions], 1)
        logits = m.step(tokens, positions, cache, cond)
        for t, (i, c) in enumerate(positions):
            if c < w:
                out[:, i, c] = logits[:, t]
    return out


@pytest.mark.parametrize("h, w", [(4, 5), (3, 9), (6, 2)])
def test_cached_decoding_gives_the_forward_logits(h, w):
    m = model()
    g = torch.Generator().manual_seed(h * w)
    codes = torch.randint(0, VOCAB, (2, h, w), generator=g)
    cls = torch.tensor([0, 2])
    cond = torch.randn(2, 32, h, w, generator=g)
    with torch.no_grad():
        full = m(codes, cls, cond)
    sequential = [[(i, c)] for i in range(h) for c in range(w + 1)]
    assert_close(teacher_forced(m, codes, cls, cond, sequential), full, atol=2e-5, rtol=1e-4)
    assert_close(teacher_forced(m, codes, cls, cond, wavefront_schedule(h, w + 1, m.right + 1)), full,
                 atol=2e-5, rtol=1e-4)


def test_training_loss_and_the_condition_matter():
    m = model()
    codes = torch.randint(0, VOCAB, (2, 3, 4))
    logits, loss = m(codes, targets=True)
    assert logits.shape == (2, 3, 4, VOCAB) and loss.ndim == 0
    loss.backward()
    assert m.row_start.grad is not None and m.blocks[0].attn.query.weight.grad is not None
    with torch.no_grad():
        cond = torch.randn(2, 32, 3, 4)
        assert not torch.allclose(m(codes, cond=cond), m(codes))
        changed = cond.clone()
        changed[:, :, 2, 3] += 1  # the condition at the last position changes only its own logits
        diff = (m(codes, cond=changed) - m(codes, cond=cond)).abs().amax(-1)
    assert diff[:, 2, 3].min() > 0 and diff[:, :2].max() == 0 and diff[:, 2, :3].max() == 0


def test_wavefront_and_sequential_sampling_draw_the_same_grid_at_any_size():
    m = model(n_classes=0)
    a = sample_grid(m, 5, 11, batch=2, seed=7, temperature=1.0)  # wider and taller than any training crop here
    b = sample_grid(m, 5, 11, batch=2, seed=7, temperature=1.0, wavefront=False)
    assert a.shape == (2, 5, 11) and torch.equal(a, b)
    assert not torch.equal(a, sample_grid(m, 5, 11, batch=2, seed=8))
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB


def test_greedy_sampling_is_the_argmax_of_the_forward():
    m = model(n_classes=2)
    cls = torch.tensor([1])
    grid = sample_grid(m, 3, 4, cls=cls, temperature=0.0)
    with torch.no_grad():
        logits = m(grid, cls)
    assert torch.equal(logits.argmax(-1), grid)


def test_position_uniforms_depend_only_on_the_position():
    rows_idx, cols_idx = torch.arange(50).repeat_interleave(40), torch.arange(40).repeat(50)
    u = position_uniforms(3, 2, rows_idx, cols_idx)
    assert u.shape == (2, 2000) and float(u.min()) >= 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.02 and abs(float(u.var()) - 1 / 12) < 0.01
    part = position_uniforms(3, 2, rows_idx[100:103], cols_idx[100:103])
    assert torch.equal(part, u[:, 100:103])
    assert not torch.equal(u[0], u[1])  # batch rows draw differently


def test_bad_arguments():
    m = model()
    with pytest.raises(ValueError, match="codes must be in"):
        m(torch.full((1, 2, 2), VOCAB))
    with pytest.raises(ValueError, match="cls must be in"):
        m(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([4]))
    with pytest.raises(ValueError, match="cond must be"):
        m(torch.zeros(1, 2, 2, dtype=torch.long), cond=torch.zeros(1, 32, 3, 2))
    with pytest.raises(ValueError, match="rows must be an integer >= 1"):
        sample_grid(m, 0, 3)
    with pytest.raises(TypeError, match="GPT2D"):
        sample_grid(fastvq.GPT(5, 8), 2, 2)
