"""VectorQuantizer against taming-transformers' VectorQuantizer2 (same weights), and its extras
(cosine metric, factorised codes, EMA codebook, dead-code restart) against references written here."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from taming.modules.vqvae.quantize import VectorQuantizer2

import fastvq
from fastvq import VectorQuantizer
from fastvq.ops import quantize as quantize_op
from helpers import assert_close, backend_params

# The module runs here on CPU tensors beside taming's, so the backends are the CPU ones; the triton
# kernels behind it are tested op by op in test_quantize.py.
CPU_BACKENDS = backend_params(("torch", "cpp"))

# (B, H, W, e_dim, n_e): odd sizes everywhere, the degenerate codebook n_e = 1, and wide codes.
SHAPES = [(1, 1, 1, 3, 1), (3, 5, 7, 3, 7), (2, 3, 5, 37, 1000), (1, 7, 9, 256, 7), (5, 1, 3, 37, 1), (3, 3, 5, 256, 1000)]


def make_pair(n_e, e_dim, beta=0.25, seed=0, **kwargs):
    """taming's quantizer and ours holding the same codebook. The codebook is a spread-out normal
    sample, so that argmin decisions are far from fp32 rounding (no near-ties)."""
    torch.manual_seed(seed)
    taming_kwargs = {k: v for k, v in kwargs.items() if k in ("remap", "unknown_index", "sane_index_shape", "legacy")}
    taming = VectorQuantizer2(n_e, e_dim, beta, **taming_kwargs)
    taming.embedding.weight.data.normal_()
    ours = VectorQuantizer(n_e, e_dim, beta, **kwargs)
    ours.load_state_dict(taming.state_dict())
    return taming, ours


def flat(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def run_with_grads(module, z, out_weight, **kwargs):
    """Forward, then backward of a loss that reaches z both through z_q (straight-through) and the VQ loss."""
    z = z.clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    z_q, loss, (perplexity, min_encodings, indices) = module(z, **kwargs)
    ((z_q * out_weight).sum() + 3.0 * loss).backward()
    return z_q.detach(), loss.detach(), indices, z.grad, module.embedding.weight.grad, perplexity, min_encodings


# ----------------------------------------------------------------------------- drop-in equivalence

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_match_taming(shape, legacy, backend):
    b, h, w, e_dim, n_e = shape
    taming, ours = make_pair(n_e, e_dim, beta=0.3, legacy=legacy)
    ours.backend = backend
    g = torch.Generator().manual_seed(1)
    z = torch.randn(b, e_dim, h, w, generator=g)
    out_weight = torch.randn(b, e_dim, h, w, generator=g)
    t = run_with_grads(taming, z, out_weight)
    o = run_with_grads(ours, z, out_weight)
    assert torch.equal(o[2], t[2]), "indices differ"
    assert o[2].shape == (b * h * w,) and o[2].dtype == torch.int64
    # Same operations in the same order (z + (z_q - z)): bitwise the same z_q, rounding included.
    assert torch.equal(o[0], t[0])
    assert o[0].shape == (b, e_dim, h, w) and o[0].is_contiguous()
    assert_close(o[1], t[1], rtol=1e-6, atol=0)
    assert_close(o[3], t[3], rtol=1e-5, atol=1e-8)  # grad to z
    assert_close(o[4], t[4], rtol=1e-5, atol=1e-9)  # grad to the codebook
    assert o[4].abs().sum() > 0
    assert o[6] is None and isinstance(o[5], torch.Tensor) and 1.0 <= o[5].item() <= n_e + 1e-3


def test_legacy_flag_moves_beta():
    """The two loss conventions really differ in their gradients (so the tests above can tell them apart)."""
    z = torch.randn(2, 5, 3, 3)
    grads = []
    for legacy in (True, False):
        _, ours = make_pair(11, 5, beta=0.25, legacy=legacy)
        grads.append(run_with_grads(ours, z, torch.zeros_like(z))[3:5])
    assert_close(grads[0][0] * 0.25, grads[1][0])  # grad to z: 1 vs beta
    assert_close(grads[0][1], grads[1][1] * 0.25)  # grad to codebook: beta vs 1


def test_default_init_is_tamings():
    torch.manual_seed(5)
    taming = VectorQuantizer2(1000, 37, 0.25)
    torch.manual_seed(5)
    ours = VectorQuantizer(1000, 37)
    assert torch.equal(ours.embedding.weight, taming.embedding.weight)
    assert ours.embedding.weight.abs().max() <= 1.0 / 1000


@pytest.mark.parametrize("ema", [False, True])
def test_taming_state_dict_loads_unchanged(ema):
    taming, _ = make_pair(7, 4)
    ours = VectorQuantizer(7, 4, ema=ema)
    ours.load_state_dict(taming.state_dict())  # strict
    assert torch.equal(ours.embedding.weight, taming.embedding.weight)
    if ema:  # the EMA statistics start from the loaded codebook
        assert torch.equal(ours.embed_sum, taming.embedding.weight) and torch.equal(ours.cluster_size, torch.ones(7))
    else:
        assert set(ours.state_dict()) == set(taming.state_dict()) == {"embedding.weight"}
        VectorQuantizer2(7, 4, 0.25).load_state_dict(ours.state_dict())  # and back


@pytest.fixture
def used_file(tmp_path):
    path = tmp_path / "used.npy"
    np.save(path, np.array([4, 0, 9, 2, 6, 4]))  # a repeat (4): the first position wins, as in taming
    return str(path)


@pytest.mark.parametrize("unknown_index", ["extra", 1, "random"])
@pytest.mark.parametrize("sane_index_shape", [False, True])
def test_remap_and_index_shapes_match_taming(used_file, unknown_index, sane_index_shape):
    kwargs = dict(remap=used_file, unknown_index=unknown_index, sane_index_shape=sane_index_shape)
    taming, ours = make_pair(12, 6, **kwargs)
    assert ours.re_embed == taming.re_embed and torch.equal(ours.used, taming.used)
    z = torch.randn(3, 6, 5, 7, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(9)  # "random" draws its unknown indices from the global generator in both
    t = taming(z)
    torch.manual_seed(9)
    o = ours(z)
    assert torch.equal(o[0], t[0])
    assert o[2][2].shape == t[2][2].shape == ((3, 5, 7) if sane_index_shape else (105, 1))
    assert torch.equal(o[2][2], t[2][2])
    if unknown_index != "random":
        # Known codes map to their first position in `used`; the others to unknown_index.
        raw = torch.cdist(flat(z), ours.embedding.weight).argmin(1)
        table = {4: 0, 0: 1, 9: 2, 2: 3, 6: 4}
        expected = [table.get(int(k), ours.unknown_index) for k in raw]
        assert o[2][2].reshape(-1).tolist() == expected


def test_unmap_to_all_inverts_remap_without_touching_its_input(used_file):
    taming, ours = make_pair(12, 6, remap=used_file, unknown_index="extra")
    inds = torch.tensor([[0, 1, 2, 3, 4, 5]])  # 5 is the extra "unknown" index
    before = inds.clone()
    back = ours.unmap_to_all(inds)
    assert back.tolist() == [[4, 0, 9, 2, 6, 4]]  # unknown -> used[0], as in taming
    assert torch.equal(inds, before)  # taming writes the unknown entries of its input to 0
    assert torch.equal(back, taming.unmap_to_all(inds.clone()))
    assert torch.equal(ours.remap_to_used(torch.tensor([[9, 2, 6, 4, 0]])), torch.tensor([[2, 3, 4, 0, 1]]))


@pytest.mark.parametrize("remap", [False, True])
def test_get_codebook_entry_matches_taming(used_file, remap):
    kwargs = dict(remap=used_file, unknown_index="extra") if remap else {}
    taming, ours = make_pair(12, 6, **kwargs)
    n_idx = ours.re_embed
    indices = torch.randint(0, n_idx, (2 * 3 * 4,), generator=torch.Generator().manual_seed(3))
    shape = (2, 3, 4, 6)
    out = ours.get_codebook_entry(indices.clone(), shape)
    assert out.shape == (2, 6, 3, 4)
    assert torch.equal(out, taming.get_codebook_entry(indices.clone(), shape))
    flat_out = ours.get_codebook_entry(indices.clone(), None)
    if remap:  # taming needs shape[0] here and fails with shape=None
        assert torch.equal(flat_out, ours.embedding.weight[ours.unmap_to_all(indices)])
    else:
        assert torch.equal(flat_out, taming.get_codebook_entry(indices.clone(), None))
    # And it inverts the forward: the codes of the returned indices are z_q (up to z + (z_q - z) rounding).
    plain_taming, plain = make_pair(12, 6, sane_index_shape=True)
    z = torch.randn(2, 6, 3, 4)
    z_q, _, (_, _, idx) = plain(z)
    assert_close(plain.get_codebook_entry(idx.reshape(-1), shape), z_q, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- low precision

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("module_dtype", ["fp32", "same"])
def test_low_precision_forward(dtype, module_dtype, backend):
    """z in fp16/bf16 (codebook in fp32, or in the same dtype): indices as an fp32 search of the same
    rounded values, z_q within twice the error of torch doing z + (z_q - z) in that dtype."""
    taming, ours = make_pair(257, 37, legacy=False)
    ours.backend = backend
    if module_dtype == "same":
        ours.to(dtype)
    z = torch.randn(3, 37, 5, 7, generator=torch.Generator().manual_seed(4)).to(dtype)
    z_q, loss, (_, _, idx) = ours(z)
    assert z_q.dtype == dtype and loss.dtype == torch.float32
    codebook32 = ours.embedding.weight.float()
    taming.embedding.weight.data.copy_(codebook32)
    ref_q, ref_loss, (_, _, ref_idx) = taming(z.float())
    assert (idx == ref_idx).float().mean() >= 0.99
    same = (idx == ref_idx).reshape(3, 5, 7)[:, None]
    lowp = z + (codebook32[ref_idx].to(dtype).reshape(3, 5, 7, 37).permute(0, 3, 1, 2) - z)
    torch_err = (lowp.float() - ref_q).abs().max()
    our_err = ((z_q.float() - ref_q).abs() * same).max()
    assert our_err <= 2 * torch_err + 1e-6
    assert_close(loss, ref_loss, rtol=2e-2, atol=0)


# ----------------------------------------------------------------------------- extras: cosine, factorised codes

def reference_forward(module, z):
    """What the extras mean, in plain differentiable torch: project, normalise, fp64 argmin,
    taming's loss and straight-through, project back."""
    b, c, h, w = z.shape
    x = module.project_in(flat(z))  # an Identity without codebook_dim
    codebook = module.embedding.weight
    if module.metric == "cosine":
        x, codebook = F.normalize(x, dim=1), F.normalize(codebook, dim=1)
    idx = torch.cdist(x.detach().double(), codebook.detach().double()).argmin(1)
    x_q = codebook[idx]
    w_commit, w_code = (1.0, module.beta) if module.legacy else (module.beta, 1.0)
    loss = w_commit * F.mse_loss(x, x_q.detach()) + w_code * F.mse_loss(x.detach(), x_q)
    out = module.project_out(x + (x_q - x).detach())
    return out.reshape(b, h, w, c).permute(0, 3, 1, 2), loss, idx


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("metric,codebook_dim", [("cosine", None), ("l2", 8), ("cosine", 8), ("l2", 37)])
def test_cosine_and_factorised_codes_match_reference(metric, codebook_dim, backend):
    torch.manual_seed(6)
    ours = VectorQuantizer(300, 37, beta=0.3, legacy=False, metric=metric, codebook_dim=codebook_dim, backend=backend)
    ours.embedding.weight.data.normal_()
    ref = copy.deepcopy(ours)
    if codebook_dim is not None:
        assert ours.embedding.weight.shape == (300, codebook_dim)
        assert {"project_in.weight", "project_out.bias"} <= set(ours.state_dict())
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 37, 5, 3, generator=g)
    out_weight = torch.randn_like(z)
    zo, zr = z.clone().requires_grad_(True), z.clone().requires_grad_(True)
    o_q, o_loss, (_, _, o_idx) = ours(zo)
    r_q, r_loss, r_idx = reference_forward(ref, zr)
    assert torch.equal(o_idx, r_idx)
    assert_close(o_q, r_q, rtol=1e-5, atol=1e-6)
    assert_close(o_loss, r_loss, rtol=1e-5, atol=0)
    ((o_q * out_weight).sum() + o_loss).backward()
    ((r_q * out_weight).sum() + r_loss).backward()
    assert_close(zo.grad, zr.grad, rtol=1e-4, atol=1e-7)
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, p_ref.grad, rtol=1e-4, atol=1e-7, msg=name)
    if metric == "cosine" and codebook_dim is None:  # outputs are unit vectors
        assert_close(flat(o_q.detach()).norm(dim=1), torch.ones(len(o_idx)))
    # get_codebook_entry gives the same vectors as the forward (through the out-projection too).
    assert_close(ours.get_codebook_entry(o_idx, (2, 5, 3, 37)), o_q.detach(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- EMA codebook

def onehot_ema_step(state, x, decay, eps, metric):
    """The textbook EMA update (van den Oord et al. 2017, Laplace-smoothed), with a one-hot matrix."""
    cluster_size, embed_sum, codebook = state
    searched = F.normalize(codebook, dim=1) if metric == "cosine" else codebook
    idx = torch.cdist(x.double(), searched.double()).argmin(1)
    onehot = F.one_hot(idx, codebook.shape[0]).double()
    cluster_size = decay * cluster_size + (1 - decay) * onehot.sum(0)
    embed_sum = decay * embed_sum + (1 - decay) * onehot.t() @ x.double()
    n = cluster_size.sum()
    smoothed = (cluster_size + eps) / (n + codebook.shape[0] * eps) * n
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ema_updates_match_onehot_reference(metric, backend):
    torch.manual_seed(8)
    ours = VectorQuantizer(13, 5, beta=0.4, ema=True, decay=0.9, eps=1e-3, metric=metric, backend=backend)
    ours.embedding.weight.data.normal_()
    ours.embed_sum.copy_(ours.embedding.weight)
    state = (torch.ones(13, dtype=torch.float64), ours.embed_sum.double(), ours.embedding.weight.double())
    g = torch.Generator().manual_seed(9)
    for step in range(3):
        z = torch.randn(3, 5, 7, 5, generator=g).requires_grad_(True)
        codebook_before = ours.embedding.weight.clone()
        z_q, loss, (_, _, idx) = ours(z)
        x = flat(z.detach().double())
        if metric == "cosine":
            x = F.normalize(x, dim=1)
        state = onehot_ema_step(state, x, 0.9, 1e-3, metric)
        assert_close(ours.cluster_size.double(), state[0], rtol=1e-6, atol=1e-6)
        assert_close(ours.embed_sum.double(), state[1], rtol=1e-5, atol=1e-6)
        assert_close(ours.embedding.weight.double(), state[2], rtol=1e-5, atol=1e-6)
        assert not torch.equal(ours.embedding.weight, codebook_before)
        # The output and loss use the codebook from before the update: loss = beta * commitment only.
        cb = F.normalize(codebook_before, dim=1) if metric == "cosine" else codebook_before
        assert_close(loss, 0.4 * F.mse_loss(x.float(), cb[idx]), rtol=1e-5, atol=0)
        loss.backward()
        assert ours.embedding.weight.grad is None and z.grad is not None and z.grad.abs().sum() > 0


def test_eval_mode_does_not_update_but_records_usage():
    _, ours = make_pair(9, 4, ema=True, restart_threshold=5.0)
    ours.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    z = torch.randn(2, 4, 3, 3)
    ours(z)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    idx = torch.cdist(flat(z), ours.embedding.weight).argmin(1)
    assert ours.codebook_usage.item() == pytest.approx(idx.unique().numel() / 9)
    ours.train()
    ours(z)
    assert not torch.equal(ours.embedding.weight, before["embedding.weight"])


def test_plain_training_forward_leaves_codebook_to_the_optimizer():
    _, ours = make_pair(9, 4)
    before = ours.embedding.weight.clone()
    ours.train()
    ours(torch.randn(2, 4, 3, 3))
    assert torch.equal(ours.embedding.weight, before)


def test_perplexity_and_usage_from_known_assignments():
    ours = VectorQuantizer(8, 2)
    ours.embedding.weight.data.copy_(torch.arange(16.0).reshape(8, 2) * 10)
    chosen = torch.tensor([0, 0, 0, 0, 3, 3, 5, 5])  # p = (1/2, 1/4, 1/4) over 3 of 8 codes
    z = ours.embedding.weight.detach()[chosen].reshape(1, 2, 4, 2).permute(0, 3, 1, 2) + 0.1
    _, _, (perplexity, _, idx) = ours(z)
    assert sorted(idx.tolist()) == sorted(chosen.tolist())
    assert perplexity.item() == pytest.approx(2 ** 1.5, rel=1e-5)
    assert ours.perplexity.item() == pytest.approx(2 ** 1.5, rel=1e-5)
    assert ours.codebook_usage.item() == pytest.approx(3 / 8)


# ----------------------------------------------------------------------------- dead-code restart

def far_codebook(ours, n_live):
    """Codes 0..n_live-1 near the data, the rest far away: those are never chosen."""
    with torch.no_grad():
        ours.embedding.weight.normal_()
        ours.embedding.weight[n_live:] += 100.0
        if ours.ema:
            ours.embed_sum.copy_(ours.embedding.weight)


def assert_rows_of(rows, x):
    """Every row is one of x's rows (a seed taken from the batch)."""
    assert torch.cdist(rows.double(), x.double()).min(1).values.max() < 1e-5


def test_ema_restart_reseeds_dead_codes_from_the_batch():
    torch.manual_seed(10)
    ours = VectorQuantizer(10, 3, ema=True, decay=0.5, restart_threshold=0.3)
    far_codebook(ours, 4)
    z = torch.randn(2, 3, 4, 5)
    ours(z)
    # Unused codes' counts decay 1 -> 0.5 (still >= 0.3: kept) ...
    assert torch.all(ours.embedding.weight[4:].abs() > 50)
    ours(z)  # ... -> 0.25 < 0.3: codes 4..9 restart now
    dead = ours.embedding.weight[4:]
    assert dead.abs().max() < 50
    assert_rows_of(dead, flat(z))
    assert_close(ours.cluster_size[4:], torch.full((6,), 0.3))
    assert_close(ours.embed_sum[4:], dead * 0.3)


def test_restart_without_ema_keeps_the_searched_codebook_for_backward():
    torch.manual_seed(11)
    ours = VectorQuantizer(10, 3, beta=0.25, restart_threshold=1.0)
    far_codebook(ours, 4)
    plain = copy.deepcopy(ours)
    plain.restart_threshold = 0.0
    z = torch.randn(2, 3, 4, 5)
    out_weight = torch.randn_like(z)
    o = run_with_grads(ours, z, out_weight)
    p = run_with_grads(plain, z, out_weight)
    used = torch.zeros(10, dtype=torch.bool)
    used[p[2]] = True
    # Unused codes (count 0 < 1) now hold batch rows; used ones are untouched.
    assert_rows_of(ours.embedding.weight[~used].detach(), flat(z))
    assert torch.equal(ours.embedding.weight[used], plain.embedding.weight[used])
    # Output, loss and gradients are those of the codebook that was searched.
    for a, b in zip(o[:5], p[:5]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input, atomicity

def snapshot(module):
    state = {k: v.clone() for k, v in module.state_dict().items()}
    state.update(perplexity=module.perplexity.clone(), codebook_usage=module.codebook_usage.clone())
    return state


def assert_unchanged(module, before):
    after = snapshot(module)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed by a failed call"


@pytest.mark.parametrize("bad,error,words", [
    (torch.randn(2, 4, 3), ValueError, ["z", "(batch, e_dim=4, height, width)", "(2, 4, 3)"]),
    (torch.randn(2, 5, 3, 3), ValueError, ["z", "e_dim=4", "(2, 5, 3, 3)"]),
    (torch.randint(0, 3, (2, 4, 3, 3)), TypeError, ["z", "floating-point", "int64"]),
    (np.zeros((2, 4, 3, 3), dtype=np.float32), TypeError, ["z", "torch.Tensor", "ndarray"]),
    (torch.randn(0, 4, 3, 3), ValueError, ["z", "empty"]),
])
def test_bad_input_raises_and_changes_nothing(bad, error, words):
    _, ours = make_pair(9, 4, ema=True, restart_threshold=2.0)
    ours(torch.randn(1, 4, 2, 2))  # non-trivial statistics to protect
    before = snapshot(ours)
    with pytest.raises(error) as info:
        ours(bad)
    for word in words:
        assert word in str(info.value)
    assert_unchanged(ours, before)


def test_failure_after_the_search_changes_nothing(monkeypatch):
    """Fail at the last step before the commit (drawing restart seeds, a broadcast under DDP)."""
    _, ours = make_pair(9, 4, ema=True, restart_threshold=2.0)
    ours(torch.randn(1, 4, 2, 2))
    before = snapshot(ours)

    def broken(*args):
        raise RuntimeError("broadcast failed")

    monkeypatch.setattr(ours, "_restart_seeds", broken)
    with pytest.raises(RuntimeError, match="broadcast failed"):
        ours(torch.randn(1, 4, 2, 2))
    assert_unchanged(ours, before)
    # and inside the op, between the search and the gather (the torch backend's two steps)
    monkeypatch.undo()
    ours.backend = "torch"
    torch_kernels = quantize_op.KERNELS["torch"]
    monkeypatch.setitem(quantize_op.KERNELS, "torch", torch_kernels._replace(gather=broken))
    with pytest.raises(RuntimeError, match="broadcast failed"):
        ours(torch.randn(1, 4, 2, 2))
    assert_unchanged(ours, before)


def test_unavailable_backend_and_bad_arguments():
    _, ours = make_pair(9, 4, ema=True)
    before = snapshot(ours)
    ours.backend = "no-such-backend"
    with pytest.raises(ValueError, match="backend"):
        ours(torch.randn(1, 4, 2, 2))
    assert_unchanged(ours, before)
    ours.backend = None
    with pytest.raises(ValueError, match="temp"):
        ours(torch.randn(1, 4, 2, 2), temp=0.5)
    assert_unchanged(ours, before)
    for kwargs, word in [(dict(n_e=0, e_dim=4), "n_e"), (dict(n_e=4, e_dim=4, metric="dot"), "metric"),
                         (dict(n_e=4, e_dim=4, decay=1.0), "decay"), (dict(n_e=4, e_dim=4, codebook_dim=0), "codebook_dim"),
                         (dict(n_e=4, e_dim=4, unknown_index="x"), "unknown_index")]:
        with pytest.raises(ValueError, match=word):
            VectorQuantizer(**kwargs)


def test_exported_from_package():
    assert fastvq.VectorQuantizer is VectorQuantizer and "VectorQuantizer" in fastvq.__all__
