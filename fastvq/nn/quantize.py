"""VectorQuantizer: a drop-in for taming-transformers' VectorQuantizer2, on the fused VQ op.

With the defaults it computes what taming computes (indices, z_q, loss and both gradients) and
loads taming checkpoints unchanged (the codebook is `embedding.weight`). The search, gather, loss
and straight-through gradient are one autograd node (`fastvq.ops.vector_quantize`), so no N x K
distance matrix and no one-hot matrix is ever built.

Keyword-only extras, all off by default:
  metric="cosine"      quantise l2-normalised vectors against l2-normalised codes (ViT-VQGAN, LlamaGen)
  codebook_dim=d       factorised codes: Linear e_dim -> d before the search, d -> e_dim after it
  ema=True             codebook = EMA of assigned vectors (Laplace-smoothed), no codebook gradient
  restart_threshold=t  in training, codes whose count falls below t are re-seeded from the batch
  backend=...          forwarded to the op ("torch", "cpp", "triton"; None = automatic)

Under torch.distributed (world size > 1) the per-code counts and sums are summed over ranks
before any update, and restart seeds come from rank 0, so every rank keeps the same codebook.
A call that raises leaves the codebook and EMA buffers untouched: inputs are validated first and
every update is computed into temporaries that are copied in only at the very end. z (and the codebook,
and project_in's output) must be finite: a NaN or inf is refused naming its (b, h, w) before any
buffer is updated, since one NaN averaged into the EMA would spread to its code for good.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._checks import check_finite, check_float, check_int, check_positive, check_prob
from ..ops.quantize import vector_quantize

METRICS = ("l2", "cosine")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _check_config(n_e, e_dim, beta, unknown_index, metric, codebook_dim, decay, eps, restart_threshold):
    where = "VectorQuantizer"
    check_int(where, "n_e", n_e, 1)
    check_int(where, "e_dim", e_dim, 1)
    if codebook_dim is not None:
        check_int(where, "codebook_dim", codebook_dim, 1)
    check_float(where, "beta", beta, 0.0)
    if unknown_index not in ("random", "extra") and not isinstance(unknown_index, numbers.Integral):
        raise ValueError(f"VectorQuantizer: unknown_index must be 'random', 'extra' or an integer, got {unknown_index!r}")
    if metric not in METRICS:
        raise ValueError(f"VectorQuantizer: metric must be one of {METRICS}, got {metric!r}")
    check_prob(where, "decay", decay)
    check_positive(where, "eps", eps)
    check_float(where, "restart_threshold", restart_threshold, 0.0)


def _check_gumbel_args(temp, rescale_logits, return_logits):
    # taming accepts these only so that its Gumbel quantizer and this one share a call signature.
    if not (temp is None or temp == 1.0) or rescale_logits or return_logits:
        raise ValueError("VectorQuantizer.forward: temp, rescale_logits and return_logits exist only for "
                         "interface compatibility with GumbelQuantize; leave them at None/False/False")


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of a (B, e_dim, H, W) grid with a straight-through gradient.

    forward(z) -> (z_q, loss, (perplexity, None, indices)); taming returns None for perplexity and a
    one-hot matrix for the middle entry; here perplexity is a tensor and no one-hot is built.
    Loss: legacy=True (taming's default) is mse(z, sg z_q) + beta * mse(sg z, z_q), legacy=False
    puts beta on the commitment term instead, and ema=True is beta * mse(z, sg z_q) alone.
    After every call `perplexity` and `codebook_usage` (fraction of codes used) hold the batch's
    statistics, summed over ranks in distributed training.
    """

    def __init__(self, n_e, e_dim, beta=0.25, remap=None, unknown_index="random", sane_index_shape=False,
                 legacy=True, *, metric="l2", codebook_dim=None, ema=False, decay=0.99, eps=1e-5,
                 restart_threshold=0.0, backend=None):
        super().__init__()
        _check_config(n_e, e_dim, beta, unknown_index, metric, codebook_dim, decay, eps, restart_threshold)
        self.n_e, self.e_dim, self.beta, self.legacy = int(n_e), int(e_dim), float(beta), bool(legacy)
        self.sane_index_shape = sane_index_shape
        self.metric, self.ema, self.decay, self.eps = metric, bool(ema), float(decay), float(eps)
        self.restart_threshold, self.backend = float(restart_threshold), backend
        self.codebook_dim = self.e_dim if codebook_dim is None else int(codebook_dim)

        # Built before anything else that draws random numbers, so that under the same seed the
        # codebook is the one taming would have initialised.
        self.embedding = nn.Embedding(self.n_e, self.codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
        factorised = codebook_dim is not None
        self.project_in = nn.Linear(self.e_dim, self.codebook_dim) if factorised else nn.Identity()
        self.project_out = nn.Linear(self.codebook_dim, self.e_dim) if factorised else nn.Identity()

        if self.ema:
            # The codebook moves by the EMA, not by the optimizer. A count of one per code with
            # embed_sum = codebook makes the first update start from the initial codebook.
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.ones(self.n_e))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())

        self.remap = remap
        self.unknown_index = unknown_index
        self.re_embed = self.n_e
        if remap is not None:
            self.register_buffer("used", torch.tensor(np.load(remap)))
            self.re_embed = self.used.shape[0]
            if unknown_index == "extra":  # one more index, after the used ones, means "unknown"
                self.unknown_index = self.re_embed
                self.re_embed += 1

        # Not persistent: statistics of the last batch have no place in a checkpoint, and leaving
        # them out keeps the state dict identical to taming's.
        self.register_buffer("perplexity", torch.zeros(()), persistent=False)
        self.register_buffer("codebook_usage", torch.zeros(()), persistent=False)

    def extra_repr(self) -> str:
        extras = [f"n_e={self.n_e}", f"e_dim={self.e_dim}", f"beta={self.beta}", f"legacy={self.legacy}"]
        if self.metric != "l2":
            extras.append(f"metric={self.metric!r}")
        if not isinstance(self.project_in, nn.Identity):
            extras.append(f"codebook_dim={self.codebook_dim}")
        if self.ema:
            extras.append(f"ema=True, decay={self.decay}, eps={self.eps}")
        if self.restart_threshold > 0:
            extras.append(f"restart_threshold={self.restart_threshold}")
        return ", ".join(extras)

    # ------------------------------------------------------------------------- forward

    def forward(self, z, temp=None, rescale_logits=False, return_logits=False):
        self._check_input(z)
        _check_gumbel_args(temp, rescale_logits, return_logits)
        b, _, h, w = z.shape
        x = self.project_in(z.permute(0, 2, 3, 1).reshape(-1, self.e_dim))
        if self.metric == "cosine":
            x = F.normalize(x, dim=1)
        updates_codebook = self.training and (self.ema or self.restart_threshold > 0)
        commitment_weight, codebook_weight = self._loss_weights()
        x_q, loss, idx = vector_quantize(x, self._search_codebook(snapshot=updates_codebook),
                                         commitment_weight=commitment_weight, codebook_weight=codebook_weight,
                                         backend=self.backend)

        counts, sums = self._code_statistics(x.detach(), idx)
        perplexity, usage = self._usage_statistics(counts)
        pending = [(self.perplexity, perplexity), (self.codebook_usage, usage)]
        if updates_codebook:
            pending += self._codebook_updates(x.detach(), counts, sums)
        indices = self._format_indices(idx, b, h, w)
        self._commit(pending)

        z_q = self.project_out(x_q).reshape(b, h, w, self.e_dim).permute(0, 3, 1, 2).contiguous()
        return z_q, loss, (perplexity, None, indices)

    def _check_input(self, z):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"VectorQuantizer: z must be a torch.Tensor of shape (batch, {self.e_dim}, height, width), "
                            f"got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"VectorQuantizer: z must be a floating-point tensor (float32, bfloat16, float16, float64), got {z.dtype}")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"VectorQuantizer: z must have shape (batch, e_dim={self.e_dim}, height, width), "
                             f"got {tuple(z.shape)}")
        if z.numel() == 0:
            raise ValueError(f"VectorQuantizer: z must not be empty, got shape {tuple(z.shape)}")
        check_finite("VectorQuantizer", "z", z, vector_dim=1, row="the vector z[b, :, h, w] at (b, h, w) =")

    def _loss_weights(self):
        if self.ema:  # the codebook follows the EMA, so only the encoder is pulled (by beta)
            return self.beta, 0.0
        if self.legacy:  # taming's default, which puts beta on the codebook term
            return 1.0, self.beta
        return self.beta, 1.0

    def _search_codebook(self, snapshot):
        codebook = self.embedding.weight
        if self.ema:
            codebook = codebook.detach()
        if snapshot:
            # This call rewrites the weight in place after the search; the backward pass must see
            # the codes that were searched, not the updated ones.
            codebook = codebook.clone()
        if self.metric == "cosine":
            codebook = F.normalize(codebook, dim=1)
        return codebook

    # ------------------------------------------------------------------------- statistics and updates

    @torch.no_grad()
    def _code_statistics(self, x, idx):
        """Per-code counts and, when the EMA will update, per-code sums of x: segmented reductions
        by index (no one-hot), summed over ranks in distributed training."""
        stats = torch.bincount(idx, minlength=self.n_e).to(torch.float32)[:, None]
        if self.ema and self.training:
            sums = torch.zeros(self.n_e, x.shape[1], dtype=torch.float32, device=x.device)
            stats = torch.cat([stats, sums.index_add_(0, idx, x.float())], dim=1)
        # Only in training, where every rank steps together; an eval call on one rank alone must not hang.
        if self.training and _distributed():
            dist.all_reduce(stats)
        return stats[:, 0], stats[:, 1:]

    @torch.no_grad()
    def _usage_statistics(self, counts):
        p = counts / counts.sum()
        perplexity = torch.exp(-torch.special.xlogy(p, p).sum())  # xlogy: unused codes add 0, not NaN
        return perplexity, (counts > 0).float().mean()

    @torch.no_grad()
    def _codebook_updates(self, x, counts, sums):
        """New codebook (and EMA statistics) as (destination, value) pairs, nothing written yet."""
        weight = self.embedding.weight.detach()
        if self.ema:
            cluster_size = self.decay * self.cluster_size.float() + (1 - self.decay) * counts
            embed_sum = self.decay * self.embed_sum.float() + (1 - self.decay) * sums
            weight = embed_sum / self._smoothed(cluster_size)[:, None]
            alive = cluster_size
        else:
            alive = counts
        if self.restart_threshold > 0:
            dead = alive < self.restart_threshold
            n_dead = int(dead.sum())  # the same on every rank: the counts were all-reduced
            if n_dead:
                seeds = self._restart_seeds(x, n_dead)
                weight = weight.float().clone()
                weight[dead] = seeds
                if self.ema:  # a restarted code starts as if it had been seen threshold times
                    cluster_size[dead] = self.restart_threshold
                    embed_sum[dead] = seeds * self.restart_threshold
        pending = [(self.embedding.weight, weight)]
        if self.ema:
            pending += [(self.cluster_size, cluster_size), (self.embed_sum, embed_sum)]
        return pending

    def _smoothed(self, cluster_size):
        # Laplace smoothing keeps an unused code's denominator away from zero while keeping the
        # total count unchanged.
        n = cluster_size.sum()
        return (cluster_size + self.eps) / (n + self.n_e * self.eps) * n

    def _restart_seeds(self, x, n):
        """n random rows of the batch; every rank must install the same ones, so rank 0's are sent."""
        seeds = x[torch.randint(0, x.shape[0], (n,), device=x.device)].float()
        if _distributed():
            dist.broadcast(seeds, src=0)
        return seeds

    @staticmethod
    @torch.no_grad()
    def _commit(pending):
        for destination, value in pending:
            destination.copy_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A taming checkpoint holds only embedding.weight: start the EMA statistics from it, as
        # __init__ starts them from the initial codebook.
        weight = state_dict.get(prefix + "embedding.weight")
        if self.ema and weight is not None:
            state_dict.setdefault(prefix + "cluster_size", torch.ones(weight.shape[0], dtype=weight.dtype))
            state_dict.setdefault(prefix + "embed_sum", weight.clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------------- indices

    def _format_indices(self, idx, b, h, w):
        # taming's shapes: (B*H*W,) plainly, (B*H*W, 1) after a remap, (B, H, W) when sane.
        if self.remap is not None:
            idx = self.remap_to_used(idx.reshape(b, -1)).reshape(-1, 1)
        if self.sane_index_shape:
            idx = idx.reshape(b, h, w)
        return idx

    def remap_to_used(self, inds):
        """Codebook index -> its position in `used`; indices not in `used` get unknown_index
        ("random" draws one uniformly from range(re_embed), like taming)."""
        used = self.used.to(device=inds.device, dtype=torch.long)
        n_used = used.numel()
        # A lookup table instead of taming's (N, n_used) match matrix; amin keeps the first
        # position of a repeated code, as taming's argmax over matches does.
        size = max(self.n_e, int(used.max()) + 1)
        table = torch.full((size,), n_used, dtype=torch.long, device=inds.device)
        table.scatter_reduce_(0, used, torch.arange(n_used, device=inds.device), reduce="amin")
        inside = (inds >= 0) & (inds < size)
        new = torch.where(inside, table[inds.clamp(0, size - 1)], n_used)
        unknown = new == n_used
        if self.unknown_index == "random":
            # Drawn on the CPU generator with taming's shape, so seeded runs agree with taming.
            new[unknown] = torch.randint(0, self.re_embed, (int(unknown.sum()),)).to(new.device)
        else:
            new[unknown] = self.unknown_index
        return new

    def unmap_to_all(self, inds):
        """Position in `used` -> codebook index; the "extra" unknown index maps to used[0] (taming)."""
        used = self.used.to(device=inds.device, dtype=torch.long)
        if self.re_embed > used.numel():
            inds = torch.where(inds >= used.numel(), torch.zeros_like(inds), inds)
        return used[inds]

    def get_codebook_entry(self, indices, shape):
        """Code vectors for indices, as (B, e_dim, H, W) when shape = (B, H, W, e_dim) is given."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices).reshape(-1)
        codes = self.embedding.weight
        if self.metric == "cosine":
            codes = F.normalize(codes, dim=1)
        z_q = self.project_out(F.embedding(indices, codes))
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q
