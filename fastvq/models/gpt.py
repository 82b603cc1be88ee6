"""GPT: taming-transformers' minGPT prior on sliding-window attention, with cached sampling.

The module tree and parameter names are minGPT's as taming ships it (tok_emb, pos_emb, drop,
blocks.N.{ln1, ln2, attn.{key, query, value, proj}, mlp.{0, 2}}, ln_f, head), so taming
checkpoints load unchanged (GPT.from_mingpt) and give the same logits. What differs:
  * window: each token attends to the previous `window` positions (itself included); None means
    window = block_size, i.e. taming's full causal attention;
  * rope=True: rotary position embeddings in attention instead of the learned pos_emb (which is then
    absent), so positions are not bounded by block_size and a window + rope model samples
    arbitrarily long sequences from a ring-buffer cache of `window` slots per layer;
  * sampling goes through a preallocated KVCache (GPT.prefill, GPT.step) instead of taming's
    growing list of presents, and through the fused fastvq.sample_logits;
  * one decode step (GPT.step -> Block._step -> SlidingWindowSelfAttention._step) for every
    device and dtype: its Linear layers run through fastvq.decode_linear, which streams each weight
    once at memory speed with GELU and the residual add fused in, and the attention through
    fastvq.sliding_window_decode_qkv. The weights it reads are an explicit GPTDecodeWeights
    (model.decode_weights(): q/k/v stacked, in transparent huge pages on CPU, rebuilt when a
    parameter changes; the parameters themselves are untouched). On CPU that holds a second copy
    of the Linear weights while decoding; model.free_decode_weights() gives it back.

sample_with_past(x, model, steps, ...) is taming's sampler (taming.modules.transformer.mingpt) with
the same call and result on a fastvq.GPT; convert a taming model first with GPT.from_mingpt.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, check_pos
from ..nn.attention import AttentionDecodeWeights, SlidingWindowSelfAttention, StepKernels, step_kernels
from ..nn.decode_state import DecodeWeights, ParameterSlots, packed_in_huge_pages
from ..nn.kv_cache import KVCache
from ..ops.sampling import check_sample_args
from ..ops.sampling import sample_logits as fused_sample_logits

_INDEX_DTYPES = (torch.int64, torch.int32)


def _check_int(name: str, value, minimum: int) -> int:
    return check_int("GPT", name, value, minimum)


class BlockDecodeWeights(NamedTuple):
    """What a Block's decode step reads: its attention's weights and the MLP's two weights."""
    attn: AttentionDecodeWeights
    fc1: torch.Tensor
    fc2: torch.Tensor


class GPTDecodeWeights(NamedTuple):
    """What GPT.step reads: one BlockDecodeWeights a layer and the head's weight (copies, see
    fastvq.nn.decode_state)."""
    layers: tuple
    head: torch.Tensor


class Block(nn.Module):
    """minGPT's pre-LayerNorm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, n_embd: int, n_head: int, window: int, attn_pdrop: float, resid_pdrop: float, rope: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.attn = SlidingWindowSelfAttention(n_embd, n_head, window, attn_pdrop, resid_pdrop, rope)
        self.mlp = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.GELU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(resid_pdrop),
        )
        self._mlp_copies = DecodeWeights(self._mlp_weights, self._build_mlp_copies)

    def _mlp_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mlp[0].weight, self.mlp[2].weight

    def _build_mlp_copies(self) -> tuple[torch.Tensor, torch.Tensor]:
        return packed_in_huge_pages(*self._mlp_weights())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))

    def prefill(self, x: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        """forward on tokens at positions 0 .. T-1, leaving their keys/values in the ring (only the
        last `slots` of them, the ones a later query can still need, in slots p % slots)."""
        y, present = self.attn(self.ln1(x), return_present=True, start_pos=0)
        slots, t = cache_k.shape[2], x.shape[1]
        kept = torch.arange(max(t - slots, 0), t, device=x.device)
        cache_k.index_copy_(2, kept % slots, present[0].index_select(2, kept))
        cache_v.index_copy_(2, kept % slots, present[1].index_select(2, kept))
        x = x + y
        return x + self.mlp(self.ln2(x))

    def decode_weights(self) -> BlockDecodeWeights:
        """The tensors _step reads, rebuilt when a parameter changes (fastvq.nn.decode_state)."""
        return BlockDecodeWeights(self.attn.decode_weights(), *self._mlp_copies.get())

    def _step(self, x, cache_k, cache_v, pos, positions, weights: BlockDecodeWeights, kernels: StepKernels):
        """One decode step of the block on checked arguments (inference: no dropout)."""
        c = x.shape[-1]
        x = self.attn._step(F.layer_norm(x, (c,), self.ln1.weight, self.ln1.bias, self.ln1.eps), cache_k, cache_v,
                            pos, positions, weights.attn, kernels, residual=x)
        h = kernels.linear(F.layer_norm(x, (c,), self.ln2.weight, self.ln2.bias, self.ln2.eps), weights.fc1,
                           self.mlp[0].bias, None, "gelu")
        return kernels.linear(h, weights.fc2, self.mlp[2].bias, x, None)


class GPT(nn.Module):
    """minGPT (taming's GPT) over a sliding window: idx (B, T) -> (logits (B, T, vocab_size), loss).

    n_unmasked (taming's prefix of mutually visible positions) is accepted for signature
    compatibility but must be 0: the attention computes a causal window rule, not a stored mask.
    """

    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 12, n_head: int = 8, n_embd: int = 256,
                 window: int | None = None, rope: bool = False, embd_pdrop: float = 0.0, resid_pdrop: float = 0.0,
                 attn_pdrop: float = 0.0, n_unmasked: int = 0):
        super().__init__()
        self.vocab_size = _check_int("vocab_size", vocab_size, 1)
        self.block_size = _check_int("block_size", block_size, 1)
        self.n_layer = _check_int("n_layer", n_layer, 1)
        self.window = self.block_size if window is None else _check_int("window", window, 1)
        self.rope = bool(rope)
        if n_unmasked != 0:
            raise ValueError(f"GPT: n_unmasked must be 0 (only causal attention is supported), got {n_unmasked!r}")
        self.tok_emb = nn.Embedding(self.vocab_size, n_embd)
        self.pos_emb = None if self.rope else nn.Parameter(torch.zeros(1, self.block_size, n_embd))
        self.drop = nn.Dropout(embd_pdrop)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, self.window, attn_pdrop, resid_pdrop, self.rope)
                                      for _ in range(self.n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, self.vocab_size, bias=False)
        self.n_head, self.n_embd = n_head, n_embd
        self.apply(self._init_weights)
        self._decode_weights = DecodeWeights(ParameterSlots(self), self._build_decode_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """minGPT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)

    def get_block_size(self) -> int:
        return self.block_size

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, window={self.window}, rope={self.rope}"

    # ------------------------------------------------------------------------- taming checkpoints

    @classmethod
    def from_mingpt(cls, model_or_state_dict, **config) -> "GPT":
        """A GPT with the weights of taming's minGPT `GPT` (a module, or its state_dict).

        From a module the configuration is read off model.config; from a state dict vocab_size,
        n_embd, block_size and n_layer are read off the tensors and n_head must be given. Keyword
        arguments override (window, for instance: a full-attention checkpoint run with a window).
        The model comes back on the weights' device and in their dtype.
        taming's causal-mask buffers are checked (lower-triangular) and dropped. rope=True is
        refused: minGPT's positions are the learned pos_emb.
        """
        if isinstance(model_or_state_dict, nn.Module):
            cfg = model_or_state_dict.config
            found = {name: getattr(cfg, name) for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                                           "embd_pdrop", "resid_pdrop", "attn_pdrop", "n_unmasked")
                     if hasattr(cfg, name)}
            state_dict = model_or_state_dict.state_dict()
        else:
            state_dict = dict(model_or_state_dict)
            missing = [k for k in ("tok_emb.weight", "pos_emb") if k not in state_dict]
            if missing:
                raise ValueError(f"GPT.from_mingpt: not a minGPT state dict (no {', '.join(missing)})")
            vocab_size, n_embd = state_dict["tok_emb.weight"].shape
            layers = {int(k.split(".")[1]) for k in state_dict if k.startswith("blocks.")}
            found = {"vocab_size": vocab_size, "n_embd": n_embd, "block_size": state_dict["pos_emb"].shape[1],
                     "n_layer": max(layers) + 1 if layers else 0}
            if "n_head" not in config:
                raise ValueError("GPT.from_mingpt: n_head cannot be read off a state dict; pass n_head=")
        if config.get("rope"):
            raise ValueError("GPT.from_mingpt: rope=True does not apply to minGPT weights (they use the learned pos_emb)")
        model = cls(**{**found, **config})
        model.load_state_dict(state_dict)
        weight = state_dict["tok_emb.weight"]  # keep the checkpoint's device and dtype
        return model.to(device=weight.device, dtype=weight.dtype)

    # ------------------------------------------------------------------------- checks

    def _check_idx(self, idx, name: str = "idx") -> None:
        if not isinstance(idx, torch.Tensor) or idx.dim() != 2:
            got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"GPT: {name} must be a (B, T) tensor of token indices, got {got}")
        if idx.dtype not in _INDEX_DTYPES:
            raise TypeError(f"GPT: {name} must be int64 or int32 token indices, got {idx.dtype}")

    def _check_tokens(self, idx, where: str, name: str) -> None:
        """Every token of idx in [0, vocab_size): one host sync on an accelerator (callers that must
        not sync skip it there; the embedding lookup would then fail on the device instead)."""
        if idx.numel() == 0:
            return
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{where}: {name} holds token {bad}, outside the vocabulary [0, {self.vocab_size}) "
                             f"of this model (vocab_size {self.vocab_size})")

    def _check_length(self, t: int, what: str) -> None:
        if not self.rope and t > self.block_size:
            raise ValueError(f"GPT: {what} {t} positions but block_size is {self.block_size} "
                             "(only rope=True models go past block_size)")

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(idx)
        if self.pos_emb is not None:
            x = x + self.pos_emb[0].index_select(0, positions)
        return self.drop(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln_f(x))

    # ------------------------------------------------------------------------- public

    def forward(self, idx: torch.Tensor, embeddings: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        """taming's forward: idx (B, T) int64; embeddings (B, T_e, n_embd) prepended to the token
        embeddings; targets (B, T_e + T) for the cross-entropy loss. Returns (logits, loss or None)."""
        self._check_idx(idx)
        if idx.device.type == "cpu":  # on an accelerator a check would sync the host every training step
            self._check_tokens(idx, "GPT", "idx")
        x = self.tok_emb(idx)
        if embeddings is not None:
            x = torch.cat((embeddings, x), dim=1)
        t = x.shape[1]
        self._check_length(t, "the input has")
        if self.pos_emb is not None:
            x = x + self.pos_emb[:, :t]
        x = self.blocks(self.drop(x))
        logits = self._logits(x)
        loss = None if targets is None else F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def new_cache(self, batch_size: int, slots: int | None = None, *, device=None, dtype=None) -> KVCache:
        """A KVCache for this model: `window` slots per layer by default (one token per step;
        n tokens per step need window + n - 1). device and dtype default to the parameters'."""
        p = self.head.weight
        slots = self.window if slots is None else slots
        return KVCache(self.n_layer, batch_size, self.n_head, self.n_embd // self.n_head, slots,
                       device=device or p.device, dtype=dtype or p.dtype)

    def _check_cache(self, cache, batch: int) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"GPT: cache must be a fastvq.KVCache (from model.new_cache), got {type(cache).__name__}")
        expected = (self.n_layer, batch, self.n_head, self.n_embd // self.n_head)
        n, b, h, _, d = cache.k.shape
        if (n, b, h, d) != expected:
            raise ValueError(f"GPT: cache is {cache!r} but this model and batch need n_layer={expected[0]}, "
                             f"batch_size={expected[1]}, n_head={expected[2]}, head_dim={expected[3]}")

    def _check_cache_dtype(self, cache, device: torch.device, where: str) -> None:
        """The keys and values written into the cache have the model's dtype (autocast's, under autocast)."""
        p = self.head.weight
        dtype = p.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        if cache.k.dtype != dtype or cache.k.device != p.device:
            raise TypeError(f"{where}: the cache is {cache.k.dtype} on {cache.k.device} but the model computes "
                            f"{dtype} on {p.device}; make the cache with model.new_cache(batch_size) (it takes "
                            f"the model's dtype and device) or convert the model")

    def prefill(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run a prefix idx (B, T) at positions 0 .. T-1 in one pass (the fused window attention)
        and store what later steps need in cache. Returns logits (B, T, vocab_size). Tokens outside
        [0, vocab_size) and a cache of another dtype or device than the model are refused."""
        self._check_idx(idx)
        self._check_cache(cache, idx.shape[0])
        self._check_cache_dtype(cache, idx.device, "GPT.prefill")
        self._check_tokens(idx, "GPT.prefill", "idx")
        if cache.slots < self.window:
            raise ValueError(f"GPT.prefill: the cache has {cache.slots} slots but later steps need at least "
                             f"window = {self.window}")
        self._check_length(idx.shape[1], "the prefix has")
        x = self._embed(idx, torch.arange(idx.shape[1], device=idx.device))
        for block, (cache_k, cache_v) in zip(self.blocks, cache):
            x = block.prefill(x, cache_k, cache_v)
        return self._logits(x)

    def step(self, idx_new: torch.Tensor, cache: KVCache, pos) -> torch.Tensor:
        """Cached decoding (inference: no gradients, no dropout): idx_new (B, n) are the tokens at
        absolute positions pos .. pos + n - 1 (pos an int or a 0-dim integer tensor on idx's device;
        a tensor stays on the device, no host sync), attending to the earlier positions held in
        cache, whose slots they overwrite in place. Returns logits (B, n, vocab_size). Without rope
        pos + n <= block_size (checked for an int pos, trusted for a tensor); with rope any position
        works. Everything is checked before the cache is touched; idx_new's tokens are checked to lie
        in [0, vocab_size) on the CPU only (elsewhere that would be a host sync every step).
        """
        self._check_idx(idx_new, "idx_new")
        self._check_cache(cache, idx_new.shape[0])
        b, n = idx_new.shape
        if cache.slots < self.window + n - 1:
            raise ValueError(f"GPT.step: the cache has {cache.slots} slots but {n} new tokens with window {self.window} "
                             f"need window + n - 1 = {self.window + n - 1}")
        pos = check_pos("GPT.step", pos, idx_new.device)
        if not isinstance(pos, torch.Tensor):
            self._check_length(pos + n, "the step reaches")
        if idx_new.device.type == "cpu":  # on an accelerator a check would sync the host every step
            self._check_tokens(idx_new, "GPT.step", "idx_new")
        with torch.no_grad():
            weights = self.decode_weights()
            if cache.k.dtype != weights.head.dtype or cache.k.device != weights.head.device:
                raise TypeError(f"GPT.step: the cache is {cache.k.dtype} on {cache.k.device} but the model is "
                                f"{weights.head.dtype} on {weights.head.device}; they must match")
            kernels = step_kernels(idx_new.device, b * n, "GPT.step")
            pos = torch.as_tensor(pos, dtype=torch.int64, device=idx_new.device)  # once, not per layer
            positions = pos + torch.arange(n, device=idx_new.device)
            x = self.tok_emb(idx_new)
            if self.pos_emb is not None:
                x = x + self.pos_emb[0].index_select(0, positions)
            rope_positions = positions if self.rope else None
            for block, layer, (cache_k, cache_v) in zip(self.blocks, weights.layers, cache):
                x = block._step(x, cache_k, cache_v, pos, rope_positions, layer, kernels)
            c = x.shape[-1]
            return kernels.linear(F.layer_norm(x, (c,), self.ln_f.weight, self.ln_f.bias, self.ln_f.eps),
                                  weights.head, self.head.bias, None, None)

    def _build_decode_weights(self) -> GPTDecodeWeights:
        return GPTDecodeWeights(tuple(block.decode_weights() for block in self.blocks),
                                packed_in_huge_pages(self.head.weight)[0])

    def decode_weights(self) -> GPTDecodeWeights:
        """The tensors GPT.step reads: per layer the stacked q/k/v, output and MLP weights, and the
        head's weight, as copies (in huge pages on CPU), rebuilt when any parameter changes. Writes
        through .data bypass the check: call free_decode_weights() after those."""
        return self._decode_weights.get()

    def free_decode_weights(self) -> None:
        """Give back the decode copies (rebuilt at the next step)."""
        self._decode_weights.invalidate()
        for block in self.blocks:
            block.attn._decode_weights.invalidate()
            block._mlp_copies.invalidate()


# ----------------------------------------------------------------------------- sampling

def _check_sampler_args(x, model, steps, cfg_scale) -> None:
    if not isinstance(model, GPT):
        raise TypeError(f"sample_with_past: model must be a fastvq.GPT (convert a taming minGPT with "
                        f"fastvq.GPT.from_mingpt), got {type(model).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise ValueError(f"sample_with_past: steps must be an integer >= 0, got {steps!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] < 1:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"sample_with_past: x must be a (B, T0) conditioning prefix with T0 >= 1, got {got}")
    if x.dtype not in _INDEX_DTYPES:
        raise TypeError(f"sample_with_past: x must be int64 or int32 token indices, got {x.dtype}")
    model._check_tokens(x, "sample_with_past", "the prefix x")
    if cfg_scale is not None and x.shape[0] % 2:
        raise ValueError(f"sample_with_past: with cfg_scale, x stacks B conditional over B unconditional prefixes, "
                         f"so its batch must be even, got {x.shape[0]}")
    # the last sampled token is never fed back: the model sees positions 0 .. T0 + steps - 2
    seen = x.shape[1] + max(steps - 1, 0)
    if not model.rope and seen > model.block_size:
        raise ValueError(f"sample_with_past: a prefix of {x.shape[1]} and {steps} steps need {seen} positions but "
                         f"block_size is {model.block_size} (only rope=True models sample past block_size)")


@torch.no_grad()
def sample_with_past(x: torch.Tensor, model: GPT, steps: int, temperature: float = 1.0, sample_logits: bool = True,
                     top_k: int | None = None, top_p: float | None = None, callback=None, *,
                     generator: torch.Generator | None = None, cfg_scale: float | None = None,
                     cache: KVCache | None = None) -> torch.Tensor:
    """taming's sample_with_past on a fastvq.GPT: continue the conditioning prefix x (B, T0) by
    `steps` tokens and return them alone, (B, steps) int64.

    The prefix is run once (GPT.prefill), then one token per step through a preallocated KVCache
    (GPT.step): with a window that is a ring of `window` slots per layer, so a rope model samples
    past block_size in constant memory. Tokens are drawn by fastvq.sample_logits (temperature,
    top_k, top_p, generator); sample_logits=False takes the argmax, which is exactly taming's
    greedy result on the same weights. callback(n) is called at the start of step n, like taming.

    Where it departs from taming: top_p applies on its own (taming applies it only together with
    top_k); top_k=0 and top_p=1 mean no filtering (HF's convention, which taming inherits).
    cfg_scale: x stacks B conditional prefixes over B unconditional ones (2B, T0); the logits are
    combined as u + cfg_scale * (c - u), each drawn token continues both halves, and (B, steps)
    is returned. cache: a KVCache from model.new_cache(x.shape[0]) to reuse (overwritten).
    The model runs in eval mode during the call (no dropout) and is restored after.
    """
    _check_sampler_args(x, model, steps, cfg_scale)
    rows, t0 = x.shape
    top_k = None if isinstance(top_k, numbers.Integral) and top_k == 0 else top_k
    top_p = None if isinstance(top_p, numbers.Real) and top_p == 1 else top_p
    temperature = temperature if sample_logits else 0.0
    # Every argument before anything runs: prefill overwrites a given cache, so a sampling argument
    # refused only at the first draw would leave the caller's cache half rewritten.
    check_sample_args("sample_with_past", rows, model.vocab_size, x.device, temperature=temperature, top_k=top_k,
                      top_p=top_p, cfg_scale=cfg_scale)
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device != x.device):
        got = generator.device if isinstance(generator, torch.Generator) else type(generator).__name__
        raise TypeError(f"sample_with_past: generator must be a torch.Generator on x's device ({x.device}) or None, "
                        f"got {got}")
    if cache is not None:
        model._check_cache(cache, rows)
        model._check_cache_dtype(cache, x.device, "sample_with_past")
        if cache.slots < model.window:
            raise ValueError(f"sample_with_past: the cache has {cache.slots} slots but sampling needs at least "
                             f"window = {model.window}")
    batch = rows // 2 if cfg_scale is not None else rows
    out = torch.empty(batch, steps, dtype=torch.int64, device=x.device)
    if steps == 0:
        return out
    cache = model.new_cache(rows) if cache is None else cache
    was_training = model.training
    model.eval()
    try:
        pos = torch.full((), t0, dtype=torch.int64, device=x.device)
        for n in range(steps):
            if callback is not None:
                callback(n)
            if n == 0:
                logits = model.prefill(x, cache)[:, -1]
            else:
                logits = model.step(token[:, None], cache, pos)[:, -1]
                pos += 1
            drawn = fused_sample_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p,
                                        cfg_scale=cfg_scale, generator=generator)
            out[:, n] = drawn
            token = drawn.repeat(2) if cfg_scale is not None else drawn
    finally:
        model.train(was_training)
    return out
