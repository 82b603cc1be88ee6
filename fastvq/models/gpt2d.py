"""GPT2D: a minGPT prior over a 2-D code grid with a window that slides in both directions, and
exact sampling at any size (sample_grid).

The sequence the transformer sees: one prefix token (a class, or the null class for an
unconditional model), then the grid row by row, each row led by a learned row-start token:
    [cls] [start c(0,0) c(0,1) ... c(0,w-1)] [start c(1,0) ...] ...
so the grid the attention works on is w + 1 tokens wide. The output at (i, j) of that grid
(j < w) predicts code c(i, j): for j = 0 it comes from the row-start token, whose window holds the
rows above (not the far end of the previous row, as a 1-D raster would give), so the model is the
same at every column and any width samples correctly. Attention is fastvq's RasterWindowSelfAttention
(axial rope, no absolute position table): nothing ties the model to one size. A spatial condition
(B, n_embd, h, w) (fastvq's condition encoder output) is added to the token whose output predicts
the code at the same (i, j).

Training uses random crops of code grids with the same mask sampling uses, so every key cached
during sampling is exactly what training saw.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_prob
from .gpt import GPT
from ..nn.raster_attention import RasterKVCache, RasterWindowSelfAttention, wavefront_schedule
from ..ops.sampling import sample_logits

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

    def forward(self, x: torch.Tensor, width: int, n_prefix: int) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), width=width, n_prefix=n_prefix)
        return x + self.mlp(self.ln2(x))

    def prefill(self, x, cache, layer):
        x = x + self.attn.prefill(self.ln1(x), cache, layer)
        return x + self.mlp(self.ln2(x))

    def step(self, x, cache, rows_idx, cols_idx, layer):
        x = x + self.attn.forward_cached(self.ln1(x), cache, rows_idx, cols_idx, layer)
        return x + self.mlp(self.ln2(x))


class GPT2D(nn.Module):
    """codes (B, h, w) [, cls (B,), cond (B, n_embd, h, w)] -> logits (B, h, w, vocab_size).

    rows / left / right: the window on the (w + 1)-wide grid (taming's crop context is 8 / 8 / 7).
    n_classes: class-conditional prefix (0: unconditional, one start token); class index n_classes
    is the null class (classifier-free guidance).
    """

    def __init__(self, vocab_size: int, n_layer: int = 8, n_head: int = 8, n_embd: int = 256, *, rows: int = 8,
                 left: int = 8, right: int = 7, n_classes: int = 0, n_kv_head: int | None = None,
                 embd_pdrop: float = 0.0, resid_pdrop: float = 0.0):
        super().__init__()
        self.vocab_size = check_int(_WHERE, "vocab_size", vocab_size, 1)
        self.n_layer = check_int(_WHERE, "n_layer", n_layer, 1)
        self.n_classes = check_int(_WHERE, "n_classes", n_classes, 0)
        self.n_embd = check_int(_WHERE, "n_embd", n_embd, 1)
        self.rows, self.left, self.right = (check_int(_WHERE, name, v, 0) for name, v in
                                            (("rows", rows), ("left", left), ("right", right)))
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

    _init_weights = staticmethod(GPT._init_weights)  # minGPT's initialisation, as the 1-D prior

    def extra_repr(self) -> str:
        return f"rows={self.rows}, left={self.left}, right={self.right}, n_classes={self.n_classes}"

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
        return cls.long()

    def _check_codes(self, codes) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3 or codes.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{_WHERE}: codes must be an int64 (B, h, w) grid of code indices, got "
                             f"{(codes.dtype, tuple(codes.shape)) if isinstance(codes, torch.Tensor) else type(codes).__name__}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"{_WHERE}: codes must be in [0, {self.vocab_size}), got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")

    def _check_cond(self, cond, shape) -> None:
        if cond is None:
            return
        b, h, w = shape
        if not isinstance(cond, torch.Tensor) or tuple(cond.shape) != (b, self.n_embd, h, w):
            raise ValueError(f"{_WHERE}: cond must be (B={b}, n_embd={self.n_embd}, h={h}, w={w}) features, got "
                             f"{tuple(cond.shape) if isinstance(cond, torch.Tensor) else type(cond).__name__}")

    # ------------------------------------------------------------------------- training

    def _grid_embeddings(self, codes: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """(B, h * (w + 1), C): per row the row-start token then the codes, condition features added
        to the token whose output predicts the code at the same (i, j)."""
        b, h, w = codes.shape
        tokens = torch.cat((self.row_start.expand(b, h, 1, self.n_embd), self.tok_emb(codes)), dim=2)  # (B, h, w+1, C)
        if cond is not None:
            tokens = tokens + F.pad(cond.permute(0, 2, 3, 1), (0, 0, 0, 1))  # column w predicts nothing
        return tokens.reshape(b, h * (w + 1), self.n_embd)

    def forward(self, codes: torch.Tensor, cls: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                *, targets: bool = False):
        """Logits (B, h, w, vocab_size) for every code of the grid; with targets=True also the
        cross-entropy against codes (the model predicts each code from the ones before it)."""
        self._check_codes(codes)
        self._check_cond(cond, codes.shape)
        b, h, w = codes.shape
        x = torch.cat((self.cls_emb(self._classes(cls, b, codes.device))[:, None], self._grid_embeddings(codes, cond)), 1)
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

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: list[tuple[int, int]], cache: RasterKVCache,
             cond: torch.Tensor | None = None) -> torch.Tensor:
        """Feed the tokens at grid positions (i, col) of the (w + 1)-wide grid: column 0 the row
        start (its token ignored), column col > 0 the code c(i, col - 1) in tokens (B, n). Returns
        logits (B, n, vocab) for codes c(i, col) (meaningless for col = w). cond (B, C, H, w)
        features of the whole picture, or None."""
        rows_idx = torch.tensor([i for i, _ in positions], device=tokens.device)
        cols_idx = torch.tensor([c for _, c in positions], device=tokens.device)
        starts = (cols_idx == 0)[None, :, None]
        x = torch.where(starts, self.row_start, self.tok_emb(tokens))
        if cond is not None:
            w = cond.shape[-1]
            inside = cols_idx < w
            feat = cond[:, :, rows_idx, cols_idx.clamp(max=w - 1)].transpose(1, 2)  # (B, n, C)
            x = x + feat * inside[None, :, None]
        for layer, block in enumerate(self.blocks):
            x = block.step(x, cache, rows_idx, cols_idx, layer)
        cache.commit(positions)
        return self.head(self.ln_f(x))


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


@torch.no_grad()
def sample_grid(model: GPT2D, rows: int, cols: int, *, batch: int = 1, cls: torch.Tensor | None = None,
                cond: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, seed: int = 0, wavefront: bool = True, callback=None) -> torch.Tensor:
    """Sample a (batch, rows, cols) grid of codes from a GPT2D at any size.

    wavefront=True decodes rows together, each right + 1 columns behind the row above (about
    cols + (rows - 1) (right + 1) steps, each a small batch of tokens); wavefront=False one token a
    step in raster order. Each code's random number comes from position_uniforms(seed, b, i, j), so
    both give the same grid for the same seed. Memory: a ring of rows + 1 + lag image rows per
    layer, whatever `rows` is. callback(done_rows) after each step (a progress bar).
    """
    rows, cols, batch = (check_int("sample_grid", n, v, 1) for n, v in (("rows", rows), ("cols", cols), ("batch", batch)))
    if not isinstance(model, GPT2D):
        raise TypeError(f"sample_grid: model must be a fastvq GPT2D, got {type(model).__name__}")
    if cond is not None and tuple(cond.shape[2:]) != (rows, cols):
        raise ValueError(f"sample_grid: cond must cover the grid, (B, C, {rows}, {cols}), got {tuple(cond.shape)}")
    lag = min(model.right + 1, cols + 1)
    schedule = wavefront_schedule(rows, cols + 1, lag) if wavefront else [[(i, j)] for i in range(rows) for j in range(cols + 1)]
    was_training = model.training
    model.eval()
    try:
        device = model.head.weight.device
        lag_rows = max(len(s) for s in schedule)
        cache = model.new_cache(batch, cols, lag_rows=lag_rows)
        model.prefill(cls, cache)
        codes = torch.zeros(batch, rows, cols, dtype=torch.long, device=device)
        for step_index, positions in enumerate(schedule):
            tokens = torch.stack([codes[:, i, c - 1] if c > 0 else codes[:, i, 0] for i, c in positions], 1)
            logits = model.step(tokens, positions, cache, cond)
            drawn = [(t, i, c) for t, (i, c) in enumerate(positions) if c < cols]
            if drawn:
                index = torch.tensor([t for t, _, _ in drawn], device=device)
                rows_idx, cols_idx = torch.tensor([i for _, i, _ in drawn]), torch.tensor([c for _, _, c in drawn])
                u = position_uniforms(seed, batch, rows_idx, cols_idx).to(device)
                chosen = logits.index_select(1, index).reshape(-1, model.vocab_size)
                new = sample_logits(chosen, temperature=temperature, top_k=top_k, top_p=top_p,
                                    uniform=u.reshape(-1)).view(batch, len(drawn))
                codes[:, rows_idx.to(device), cols_idx.to(device)] = new
            if callback is not None:
                callback(step_index)
    finally:
        model.train(was_training)
    return codes
