"""GPT2D: a minGPT prior over a 2-D code grid with a window that slides in both directions, and
exact sampling at any size (sample_grid).

The sequence the transformer sees: one prefix token (a class, or the null class for an
unconditional model), then the grid row by row, each row led by a learned row-start token:
    [cls] [start c(0,0) c(0,1) ... c(0,w-1)] [start c(1,0) ...] ...
so the grid the attention works on is w + 1 tokens wide. The output at (i, j) of that grid
(j < w) predicts code c(i, j): for j = 0 it comes from the row-start token, whose window holds the
rows above (not the far end of the previous row, as a 1-D raster would give), so the model is the
same at every column and any width samples correctly. Attention is fastvq's RasterWindowSelfAttention
(axial rope, no absolute position table): nothing ties the model to one size.

Spatial conditioning (cond_channels > 0): a condition map at pixel resolution (B, cond_channels,
h * f, w * f), f = cond_factor, goes through the model's ConditionEncoder (non-causal convolutions)
to features (B, n_embd, h, w), added to the token whose output predicts the code at the same
(i, j). The null condition (classifier-free guidance, condition dropout: cond_keep) is zero
features, as is no condition at all.

Training uses random crops of code grids with the same mask sampling uses, so every key cached
during sampling is exactly what training saw. The decode step (GPT2D.step) runs every linear layer
through fastvq's decode_linear with the step's tokens (a wavefront) as one small batch, on the same
decode-weight copies as the 1-D GPT (fastvq.nn.decode_state).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_float, check_int, check_prob
from ..nn.attention import step_kernels
from ..nn.decode_state import DecodeWeights, ParameterSlots, packed_in_huge_pages
from ..nn.raster_attention import RasterKVCache, RasterStep, RasterWindowSelfAttention, wavefront_lanes, wavefront_steps
from ..ops.sampling import sample_logits
from .cond_encoder import ConditionEncoder
from .gpt import GPT, BlockDecodeWeights, GPTDecodeWeights

_WHERE = "GPT2D"


class Block2D(nn.Module):
    """minGPT's pre-LayerNorm block on the raster window: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, n_embd: int, n_head: int, rows: int, left: int, right: int, n_kv_head, resid_pdrop: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = RasterWindowSelfAttention(n_embd, n_head, rows=rows, left=left, right=right, n_kv_head=n_kv_head,
                                              resid_pdrop=resid_pdrop)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(resid_pdrop))
        self._mlp_copies = DecodeWeights(self._mlp_weights, self._build_mlp_copies)

    def _mlp_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp[0].weight, self.mlp[2].weight

    def _build_mlp_copies(self) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_in_huge_pages(*self._mlp_weights())

    def forward(self, x: torch.Tensor, width: int, n_prefix: int) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), width=width, n_prefix=n_prefix)
        return x + self.mlp(self.ln2(x))

    def prefill(self, x, cache, layer):
        x = x + self.attn.prefill(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))

    def decode_weights(self) -> BlockDecodeWeights:
        """The tensors _step reads, rebuilt when a parameter changes (fastvq.nn.decode_state)."""
        return BlockDecodeWeights(self.attn.decode_weights(), *self._mlp_copies.get())

    def _step(self, x, cache, step: RasterStep, layer, weights: BlockDecodeWeights):
        """One decode step on checked arguments, every product through step.linear (decode_linear's
        KERNELS entry) with GELU and the residual adds fused in (inference: no dropout)."""
        x = self.attn._step(self.ln1(x), cache, step, layer, weights.attn, residual=x)
        h = step.linear(self.ln2(x), weights.fc1, self.mlp[0].bias, None, "gelu")
        return step.linear(h, weights.fc2, self.mlp[2].bias, x, None)


class GPT2D(nn.Module):
    """codes (B, h, w) [, cls (B,), cond (B, cond_channels, h * f, w * f)] -> logits (B, h, w, vocab_size).

    rows / left / right: the window on the (w + 1)-wide grid (taming's crop context is 8 / 8 / 7).
    n_classes: class-conditional prefix (0: unconditional, one start token); class index n_classes
    is the null class (classifier-free guidance).
    cond_channels: channels of a spatial condition map (0: none); the model then owns
    cond_encoder = ConditionEncoder(cond_channels, n_embd, cond_factor), cond_factor the VQGAN's
    downsampling (pixels per code along each side, a power of two).
    """

    def __init__(self, vocab_size: int, n_layer: int = 8, n_head: int = 8, n_embd: int = 256, *, rows: int = 8,
                 left: int = 8, right: int = 7, n_classes: int = 0, n_kv_head: int | None = None,
                 embd_pdrop: float = 0.0, resid_pdrop: float = 0.0, cond_channels: int = 0, cond_factor: int = 1):
        super().__init__()
        self.vocab_size = check_int(_WHERE, "vocab_size", vocab_size, 1)
        self.n_layer = check_int(_WHERE, "n_layer", n_layer, 1)
        self.n_classes = check_int(_WHERE, "n_classes", n_classes, 0)
        self.n_embd = check_int(_WHERE, "n_embd", n_embd, 1)
        self.rows, self.left, self.right = (check_int(_WHERE, name, v, 0) for name, v in
                                            (("rows", rows), ("left", left), ("right", right)))
        self.cond_channels = check_int(_WHERE, "cond_channels", cond_channels, 0)
        self.cond_factor = check_int(_WHERE, "cond_factor", cond_factor, 1)
        self.tok_emb = nn.Embedding(self.vocab_size, n_embd)
        self.cls_emb = nn.Embedding(self.n_classes + 1, n_embd)  # the last one: no class / null class
        self.row_start = nn.Parameter(torch.zeros(n_embd))
        self.drop = nn.Dropout(check_prob(_WHERE, "embd_pdrop", embd_pdrop))
        self.blocks = nn.ModuleList(Block2D(n_embd, n_head, self.rows, self.left, self.right, n_kv_head,
                                            check_prob(_WHERE, "resid_pdrop", resid_pdrop)) for _ in range(self.n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, self.vocab_size, bias=False)
        self.apply(self._init_weights)
        nn.init.normal_(self.row_start, std=0.02)
        # after apply(): the encoder keeps its own initialisation (a zero output projection)
        self.cond_encoder = (ConditionEncoder(self.cond_channels, n_embd, self.cond_factor)
                             if self.cond_channels else None)
        self._decode_weights = DecodeWeights(ParameterSlots(self), self._build_decode_weights)

    _init_weights = staticmethod(GPT._init_weights)  # minGPT's initialisation, as the 1-D prior

    def extra_repr(self) -> str:
        return (f"rows={self.rows}, left={self.left}, right={self.right}, n_classes={self.n_classes}, "
                f"cond_channels={self.cond_channels}, cond_factor={self.cond_factor}")

    # ------------------------------------------------------------------------- checks

    def _classes(self, cls, batch: int, device) -> torch.Tensor:
        if cls is None:
            return torch.full((batch,), self.n_classes, dtype=torch.long, device=device)
        if not isinstance(cls, torch.Tensor) or cls.shape != (batch,) or cls.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{_WHERE}: cls must be None or an int64 tensor ({batch},), got "
                             f"{(cls.dtype, tuple(cls.shape)) if isinstance(cls, torch.Tensor) else type(cls).__name__}")
        if batch and (int(cls.min()) < 0 or int(cls.max()) > self.n_classes):
            raise ValueError(f"{_WHERE}: cls must be in [0, {self.n_classes}] ({self.n_classes} = no class), got "
                             f"{cls.tolist() if cls.numel() <= 8 else 'values out of range'}")
        return cls.long().to(device)

    def _check_codes(self, codes) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{_WHERE}: codes must be an int64 (B, h, w) grid of code indices, got "
                             f"{(codes.dtype, tuple(codes.shape)) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"{_WHERE}: codes must be in [0, {self.vocab_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")

    def _check_cond_map(self, cond, batches: tuple[int, ...], h: int, w: int, where: str) -> None:
        """cond must be a raw map (one of `batches`, cond_channels, h * f, w * f) for a conditioned model."""
        if self.cond_encoder is None:
            raise ValueError(f"{where}: cond was given but this GPT2D has no condition encoder (cond_channels=0); "
                             "build it with cond_channels > 0 or pass cond=None")
        self.cond_encoder.check(cond, "cond", where)
        f = self.cond_factor
        expected = (self.cond_channels, h * f, w * f)
        if cond.shape[0] not in batches or tuple(cond.shape[1:]) != expected:
            b = " or ".join(str(n) for n in batches)
            raise ValueError(f"{where}: cond must be a (B={b}, cond_channels={self.cond_channels}, {h}*{f}, {w}*{f}) "
                             f"map covering the {h} x {w} code grid at cond_factor {f}, got {tuple(cond.shape)}")

    @staticmethod
    def _check_keep(cond_keep, batch: int, where: str) -> None:
        if not isinstance(cond_keep, torch.Tensor) or cond_keep.dtype != torch.bool or cond_keep.shape != (batch,):
            got = (cond_keep.dtype, tuple(cond_keep.shape)) if isinstance(cond_keep, torch.Tensor) else type(cond_keep).__name__
            raise ValueError(f"{where}: cond_keep must be None or a bool tensor ({batch},) (False: the null "
                             f"condition for that row), got {got}")

    def _check_features(self, cond, batch: int, rows_needed: int, width: int, where: str) -> None:
        ok = (isinstance(cond, torch.Tensor) and cond.dim() == 4 and cond.shape[0] in (1, batch)
              and cond.shape[1] == self.n_embd and cond.shape[2] >= rows_needed and cond.shape[3] == width)
        if not ok:
            got = tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__
            raise ValueError(f"{where}: cond must be condition features (B={batch} or 1, n_embd={self.n_embd}, H >= "
                             f"{rows_needed}, w={width}) from encode_cond, got {got}")

    # ------------------------------------------------------------------------- condition

    def encode_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition features (B, n_embd, h, w) of a raw condition map (B, cond_channels, h * f, w * f),
        f = cond_factor (moved to the model's device and dtype first).

        Raises:
            ValueError naming cond: an unconditioned model (cond_channels = 0), wrong channels or
            rank, a height or width that is not a multiple of cond_factor.
        """
        if self.cond_encoder is None:
            raise ValueError(f"{_WHERE}.encode_cond: cond was given but this GPT2D has no condition encoder "
                             "(cond_channels=0)")
        self.cond_encoder.check(cond, "cond", f"{_WHERE}.encode_cond")
        p = self.head.weight
        return self.cond_encoder(cond.to(device=p.device, dtype=p.dtype))

    def _features(self, cond, cond_keep, b: int, h: int, w: int) -> torch.Tensor | None:
        """Features (B, n_embd, h, w) for forward, zero on rows whose cond_keep is False; None
        without a condition."""
        if cond is None:
            if cond_keep is not None:
                raise ValueError(f"{_WHERE}: cond_keep was given without cond (no condition is the null condition "
                                 "already)")
            return None
        self._check_cond_map(cond, (b,), h, w, _WHERE)
        feats = self.encode_cond(cond)
        if cond_keep is None:
            return feats
        self._check_keep(cond_keep, b, _WHERE)
        return torch.where(cond_keep.to(feats.device)[:, None, None, None], feats, 0.0)

    # ------------------------------------------------------------------------- training

    def _grid_embeddings(self, codes: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
        """(B, h * (w + 1), C): per row the row-start token then the codes, condition features added
        to the token whose output predicts the code at the same (i, j)."""
        b, h, w = codes.shape
        tokens = torch.cat((self.row_start.expand(b, h, 1, self.n_embd), self.tok_emb(codes)), dim=2)  # (B, h, w+1, C)
        if feats is not None:
            tokens = tokens + F.pad(feats.permute(0, 2, 3, 1), (0, 0, 0, 1))  # column w predicts nothing
        return tokens.reshape(b, h * (w + 1), self.n_embd)

    def forward(self, codes: torch.Tensor, cls: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                *, cond_keep: torch.Tensor | None = None, targets: bool = False):
        """Logits (B, h, w, vocab_size) for every code of the grid; with targets=True also the
        cross-entropy against codes (the model predicts each code from the ones before it).

        Args:
            codes: int64 (B, h, w) code indices.
            cls: None (the null class) or int64 (B,) in [0, n_classes].
            cond: None (the null condition) or, for a model with cond_channels > 0, the raw
                condition map (B, cond_channels, h * cond_factor, w * cond_factor), encoded here.
            cond_keep: None or bool (B,): rows where it is False get the null condition (zero
                features): condition dropout in training, the unconditional half of CFG.
            targets: also return the mean cross-entropy.

        Raises:
            ValueError naming the argument (codes, cls, cond, cond_keep), and for a cond given to
            a model without a condition encoder.
        """
        self._check_codes(codes)
        b, h, w = codes.shape
        feats = self._features(cond, cond_keep, b, h, w)
        x = torch.cat((self.cls_emb(self._classes(cls, b, codes.device))[:, None], self._grid_embeddings(codes, feats)), 1)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, w + 1, 1)
        x = x[:, 1:].reshape(b, h, w + 1, self.n_embd)[:, :, :w]
        logits = self.head(self.ln_f(x))
        if not targets:
            return logits
        return logits, F.cross_entropy(logits.reshape(-1, self.vocab_size), codes.reshape(-1).long())

    # ------------------------------------------------------------------------- decoding

    def new_cache(self, batch_size: int, width: int, lag_rows: int | None = None) -> RasterKVCache:
        """Rings for `width` codes a row: rows + 1 + lag rows of the (width + 1)-wide grid per layer."""
        attn = self.blocks[0].attn
        lag_rows = self.rows + 1 if lag_rows is None else lag_rows
        p = self.head.weight
        return RasterKVCache(self.n_layer, batch_size, attn.n_kv_head, attn.head_dim, width=width + 1,
                             ring_rows=self.rows + 1 + lag_rows, n_prefix=1, device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def prefill(self, cls: torch.Tensor | None, cache: RasterKVCache) -> None:
        x = self.cls_emb(self._classes(cls, cache.k.shape[1], cache.k.device))[:, None]
        for layer, block in enumerate(self.blocks):
            x = block.prefill(x, cache, layer)
        cache.prefix_written = 1

    def _build_decode_weights(self) -> GPTDecodeWeights:
        return GPTDecodeWeights(tuple(block.decode_weights() for block in self.blocks),
                                packed_in_huge_pages(self.head.weight)[0])

    def decode_weights(self) -> GPTDecodeWeights:
        """The tensors step reads: per layer the stacked q/k/v, output and MLP weights, and the
        head's weight, as copies (in huge pages on CPU) rebuilt when any parameter changes."""
        return self._decode_weights.get()

    def free_decode_weights(self) -> None:
        """Give back the decode copies (rebuilt at the next step)."""
        self._decode_weights.invalidate()
        for block in self.blocks:
            block.attn._decode_weights.invalidate()
            block._mlp_copies.invalidate()

    def _step_inputs(self, tokens, rows_idx, cols_idx, cond, cond_keep) -> torch.Tensor:
        """The step's input embeddings (B, n, C): row start or code, plus the condition features at
        (i, col) for col < w (column w predicts nothing), zero on rows whose cond_keep is False."""
        starts = (cols_idx == 0)[None, :, None]
        x = torch.where(starts, self.row_start, self.tok_emb(tokens))
        if cond is None:
            return x
        w = cond.shape[-1]
        inside = (cols_idx < w)[None, :, None]
        feat = cond[:, :, rows_idx, cols_idx.clamp(max=w - 1)].transpose(1, 2)  # (B or 1, n, C)
        if cond_keep is not None:
            inside = inside & cond_keep.to(x.device)[:, None, None]
        return x + torch.where(inside, feat, 0.0)

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: list[tuple[int, int]], cache: RasterKVCache,
             cond: torch.Tensor | None = None, *, cond_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Feed the tokens at grid positions (i, col) of the (w + 1)-wide grid: column 0 the row
        start (its token ignored), column col > 0 the code c(i, col - 1) in tokens (B, n). Returns
        logits (B, n, vocab) for codes c(i, col) (meaningless for col = w).

        The step's tokens go through every linear layer as one small batch (fastvq.decode_linear,
        each weight read once; a GEMM past DECODE_ROWS rows), on the decode_weights() copies.

        Args:
            cond: None, or condition features (B or 1, n_embd, H, w) of the whole picture from
                encode_cond (H covering the step's rows).
            cond_keep: None or bool (B,): False rows get the null condition (zero features).

        Raises:
            ValueError (nothing written) for a step the cache refuses (RasterKVCache.check_step),
            a cache of another batch, dtype or device, bad cond / cond_keep.
        """
        b, n = tokens.shape
        if len(positions) != n:
            raise ValueError(f"{_WHERE}.step: tokens holds {n} tokens a row but positions {len(positions)}; "
                             "one position per token")
        cache.check_step(positions, rows=self.rows, left=self.left, right=self.right)
        weights = self.decode_weights()
        if cache.k.shape[1] != b or cache.k.dtype != weights.head.dtype or cache.k.device != weights.head.device:
            raise ValueError(f"{_WHERE}.step: the cache is batch {cache.k.shape[1]}, {cache.k.dtype} on "
                             f"{cache.k.device}; the tokens are batch {b} and the model {weights.head.dtype} on "
                             f"{weights.head.device}")
        rows_idx = torch.tensor([i for i, _ in positions], device=tokens.device)
        cols_idx = torch.tensor([c for _, c in positions], device=tokens.device)
        if cond is not None:
            rows_needed = max((i for i, _ in positions), default=-1) + 1
            self._check_features(cond, b, rows_needed, cache.width - 1, f"{_WHERE}.step")
        if cond_keep is not None:
            if cond is None:
                raise ValueError(f"{_WHERE}.step: cond_keep was given without cond")
            self._check_keep(cond_keep, b, f"{_WHERE}.step")
        x = self._step_inputs(tokens, rows_idx, cols_idx, cond, cond_keep)
        linear = step_kernels(x.device, b * n, f"{_WHERE}.step").linear
        step = self.blocks[0].attn.step_context(rows_idx, cols_idx, x.dtype, x.device, linear)  # every layer's
        for layer, (block, block_weights) in enumerate(zip(self.blocks, weights.layers)):
            x = block._step(x, cache, step, layer, block_weights)
        cache.commit(positions)
        return linear(self.ln_f(x), weights.head, None, None, None)


def _int64(c: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return c - (1 << 64) if c >= 1 << 63 else c


def position_uniforms(seed: int, batch: int, rows_idx: torch.Tensor, cols_idx: torch.Tensor) -> torch.Tensor:
    """(batch, n) uniforms in [0, 1) from a counter-based hash of (seed, batch row, i, j): the same
    number for the same position however positions are grouped into steps (splitmix64's finaliser
    on int64, which wraps like uint64; logical shifts emulated by masks)."""
    def mask(bits):
        return (1 << bits) - 1

    b = torch.arange(batch, dtype=torch.int64)[:, None]
    i, j = rows_idx.long().cpu()[None, :], cols_idx.long().cpu()[None, :]
    x = (b * _int64(0x9E3779B97F4A7C15) + i * _int64(0xC2B2AE3D27D4EB4F) + j * _int64(0x165667B19E3779F9)
         + _int64((int(seed) * 0xD6E8FEB86659FD93) & mask(64)))
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ ((x >> shift) & mask(64 - shift))) * _int64(mult)
    x = x ^ ((x >> 31) & mask(33))
    return ((x >> 40) & mask(24)).to(torch.float32) / float(1 << 24)


class _RowUniforms:
    """position_uniforms of the rows in flight, a row's computed once when it enters (its row start
    is fed) instead of per step: `lanes` rows are in flight at most, so lanes + 1 table rows
    suffice whatever the height (flat memory)."""

    def __init__(self, seed: int, batch: int, cols: int, lanes: int, device):
        self.seed, self.batch, self.slots = seed, batch, lanes + 1
        self.table = torch.empty(batch, self.slots, cols, device=device)
        self.cols = torch.arange(cols)

    def enter(self, positions: list[tuple[int, int]]) -> None:
        for i, col in positions:
            if col == 0:
                row = position_uniforms(self.seed, self.batch, torch.full_like(self.cols, i), self.cols)
                self.table[:, i % self.slots] = row.to(self.table.device)

    def at(self, rows_idx: torch.Tensor, cols_idx: torch.Tensor) -> torch.Tensor:
        """(batch, n) uniforms of positions (rows_idx[t], cols_idx[t]) in flight."""
        return self.table[:, rows_idx % self.slots, cols_idx]


def _grid_features(model: GPT2D, cond, batch: int, rows: int, cols: int) -> torch.Tensor | None:
    """The condition features (1 or batch, n_embd, rows, cols) of sample_grid's raw map, encoded once."""
    if cond is None:
        return None
    model._check_cond_map(cond, (1, batch), rows, cols, "sample_grid")
    return model.encode_cond(cond)


def _guided_inputs(model: GPT2D, cls, feats, batch: int, device):
    """The decoding batch for classifier-free guidance: `batch` conditional rows (cls, features),
    then `batch` unconditional ones (the null class, zero features), run through one cache.
    Returns (classes (2 batch,), features or None, cond_keep (2 batch,) or None)."""
    classes = torch.cat((model._classes(cls, batch, device), model._classes(None, batch, device)))
    if feats is None:
        return classes, None, None
    feats = feats if feats.shape[0] == 1 else feats.repeat(2, 1, 1, 1)
    keep = torch.arange(2 * batch, device=device) < batch
    return classes, feats, keep


@torch.no_grad()
def sample_grid(model: GPT2D, rows: int, cols: int, *, batch: int = 1, cls: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, cfg_scale: float | None = None, seed: int = 0, wavefront: bool = True,
                callback=None) -> torch.Tensor:
    """Sample a (batch, rows, cols) grid of codes from a GPT2D at any size.

    wavefront=True decodes rows together, each right + 1 columns behind the row above (about
    cols + (rows - 1) (right + 1) steps, each a small batch of tokens); wavefront=False one token a
    step in raster order. Each code's random number comes from position_uniforms(seed, b, i, j), so
    both give the same grid for the same seed (with or without guidance). Memory: a ring of
    rows + 1 + lag image rows per layer, whatever `rows` is, plus the condition's features.

    Args:
        model: a GPT2D (run in eval mode during the call, restored after).
        rows, cols: the grid size in codes (any, not tied to the training crops).
        batch: grids drawn at once.
        cls: None (the null class) or int64 (batch,) class indices.
        cond: None, or for a model with cond_channels > 0 the raw condition map covering the grid,
            (batch or 1, cond_channels, rows * cond_factor, cols * cond_factor); encoded once up
            front (batch 1 is shared by every grid).
        temperature, top_k, top_p: as fastvq.sample_logits.
        cfg_scale: None, or classifier-free guidance: conditional rows (cls, cond) and
            unconditional rows (the null class, zero condition features) decode as one batch of
            2 * batch through the cache, combined as u + cfg_scale * (c - u) by sample_logits.
        seed: keys the per-position random numbers.
        wavefront: wavefront (True) or one token a step (False); the same grid either way.
        callback: called with the step index after each step (a progress bar).

    Returns:
        int64 (batch, rows, cols) codes on the model's device.

    Raises:
        ValueError naming the argument (rows, cols, batch, cls, cond, cfg_scale, ...); TypeError
        for a model that is not a GPT2D.
    """
    rows, cols, batch = (check_int("sample_grid", n, v, 1) for n, v in (("rows", rows), ("cols", cols), ("batch", batch)))
    if not isinstance(model, GPT2D):
        raise TypeError(f"sample_grid: model must be a fastvq GPT2D, got {type(model).__name__}")
    if cfg_scale is not None:
        cfg_scale = check_float("sample_grid", "cfg_scale", cfg_scale)
    lag = min(model.right + 1, cols + 1)
    # generators, not lists: the schedule of a tall grid is never held whole (flat memory in height)
    schedule = wavefront_steps(rows, cols + 1, lag) if wavefront else ([(i, j)] for i in range(rows) for j in range(cols + 1))
    lanes = wavefront_lanes(rows, cols + 1, lag) if wavefront else 1
    was_training = model.training
    model.eval()
    try:
        device = model.head.weight.device
        feats = _grid_features(model, cond, batch, rows, cols)
        if cfg_scale is None:
            classes, keep, decoding = cls, None, batch
        else:
            classes, feats, keep = _guided_inputs(model, cls, feats, batch, device)
            decoding = 2 * batch
        cache = model.new_cache(decoding, cols, lag_rows=lanes)
        model.prefill(classes, cache)
        codes = torch.zeros(batch, rows, cols, dtype=torch.long, device=device)
        uniforms = _RowUniforms(seed, batch, cols, lanes, device)
        for step_index, positions in enumerate(schedule):
            uniforms.enter(positions)
            at = torch.tensor(positions, device=device)  # (n, 2): (i, col)
            # the token at (i, col) is code c(i, col - 1); a row start's (col 0) is ignored
            tokens = codes[:, at[:, 0], (at[:, 1] - 1).clamp(min=0)]
            logits = model.step(tokens.repeat(decoding // batch, 1), positions, cache, feats, cond_keep=keep)
            full = all(col < cols for _, col in positions)  # column w (the row's end) draws nothing
            drawn = None if full else (at[:, 1] < cols).nonzero()[:, 0]
            rows_idx, cols_idx = (at[:, 0], at[:, 1]) if drawn is None else (at[drawn, 0], at[drawn, 1])
            if rows_idx.numel():
                # (decoding * drawn, V), batch-major: with guidance the conditional rows then the
                # unconditional ones, as sample_logits' cfg_scale pairs them
                chosen = (logits if drawn is None else logits.index_select(1, drawn)).reshape(-1, model.vocab_size)
                new = sample_logits(chosen, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                                    uniform=uniforms.at(rows_idx, cols_idx).reshape(-1))
                codes[:, rows_idx, cols_idx] = new.view(batch, -1)
            if callback is not None:
                callback(step_index)
    finally:
        model.train(was_training)
    return codes
