"""The torch reference shared by the windowed attention ops: softmax attention under a mask rule,
a chunk of query rows at a time against only the keys the rule can reach.

A rule is a MaskRule: visible(query_pos, key_pos) -> bool (rows, keys) from absolute positions, and
keys_for(first, last) -> the key positions (int64, ascending) that queries first .. last - 1 may
see (a superset is fine: visible() decides). sliding_window_attention and raster_window_attention
are each a rule; the forward, the backward from the saved row log-sum-exp, and the GQA handling are
written once here. Memory is O(chunk * keys_for) per step, never T x T.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

CHUNK = 256  # query rows per step


class MaskRule(NamedTuple):
    visible: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    keys_for: Callable[[int, int], torch.Tensor]


def expand_kv(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Key/value heads repeated to one per query head (a view when no repeat is needed)."""
    group = heads // t.shape[1]
    return t if group == 1 else t.repeat_interleave(group, dim=1)


def fold_groups(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Sum per-query-head gradients back onto the key/value head they share."""
    b, h, t, d = grad.shape
    return grad.view(b, kv_heads, h // kv_heads, t, d).sum(2)


def _blocks(seq_len: int, chunk: int, rule: MaskRule, device):
    for a in range(0, seq_len, chunk):
        b = min(a + chunk, seq_len)
        keys = rule.keys_for(a, b).to(device)
        yield torch.arange(a, b, device=device), keys


def masked_attention_forward(q, k, v, scale: float, rule: MaskRule, chunk: int = CHUNK):
    """(out in q's dtype, lse fp32 (B, H, T)); fp32 math (fp64 inputs stay fp64). A row that sees
    no key would be NaN: both rules let every query see itself."""
    acc = torch.promote_types(q.dtype, torch.float32)
    heads = q.shape[1]
    qf, kf, vf = q.to(acc), expand_kv(k, heads).to(acc), expand_kv(v, heads).to(acc)
    out = torch.empty(q.shape, dtype=acc, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    for rows, keys in _blocks(q.shape[2], chunk, rule, q.device):
        s = (qf[:, :, rows] @ kf.index_select(2, keys).transpose(-1, -2)) * scale
        s = s.masked_fill(~rule.visible(rows, keys), float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1, keepdim=True)
        out[:, :, rows] = torch.exp(s - row_lse) @ vf.index_select(2, keys)
        lse[:, :, rows] = row_lse.squeeze(-1).float()
    return out.to(q.dtype), lse


def masked_attention_backward(grad_out, q, k, v, out, lse, scale: float, rule: MaskRule, chunk: int = CHUNK):
    """Gradients from the saved row log-sum-exp, recomputing probabilities chunk by chunk:
    dS = P * (dO V^T - rowsum(dO * O)), dQ = scale dS K, dK = scale dS^T Q, dV = P^T dO."""
    acc = torch.promote_types(q.dtype, torch.float32)
    heads, kv_heads = q.shape[1], k.shape[1]
    qf, kf, vf = q.to(acc), expand_kv(k, heads).to(acc), expand_kv(v, heads).to(acc)
    go = grad_out.to(acc)
    delta = (go * out.to(acc)).sum(-1)
    lse = lse.to(acc)
    dq = torch.zeros_like(qf)
    dk = torch.zeros_like(qf)  # per query head; folded onto the shared kv heads at the end
    dv = torch.zeros_like(qf)
    for rows, keys in _blocks(q.shape[2], chunk, rule, q.device):
        k_rows, v_rows = kf.index_select(2, keys), vf.index_select(2, keys)
        s = (qf[:, :, rows] @ k_rows.transpose(-1, -2)) * scale
        p = torch.exp(s - lse[:, :, rows, None]).masked_fill(~rule.visible(rows, keys), 0.0)
        dp = go[:, :, rows] @ v_rows.transpose(-1, -2)
        ds = p * (dp - delta[:, :, rows, None])
        dq[:, :, rows] = scale * (ds @ k_rows)
        dk.index_add_(2, keys, scale * (ds.transpose(-1, -2) @ qf[:, :, rows]))
        dv.index_add_(2, keys, p.transpose(-1, -2) @ go[:, :, rows])
    return dq.to(q.dtype), fold_groups(dk, kv_heads).to(k.dtype), fold_groups(dv, kv_heads).to(v.dtype)


class MaskedAttentionFunction(torch.autograd.Function):
    """One autograd node for a windowed attention op: saves q, k, v, out and the row log-sum-exp
    (B, H, T); `kernels` is the backend's KERNELS entry (forward(q, k, v, mask, scale),
    backward(grad_out, q, k, v, out, lse, mask, scale)), `reference` the torch one (empty inputs),
    `mask` the op's window (an int, a Geometry)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale, kernels, reference):
        run = (reference if q.numel() == 0 else kernels).forward
        out, lse = run(q.detach(), k.detach(), v.detach(), mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.config = (mask, scale, reference if q.numel() == 0 else kernels)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        mask, scale, kernels = ctx.config
        dq, dk, dv = kernels.backward(grad_out, q.detach(), k.detach(), v.detach(), out, lse, mask, scale)
        return dq, dk, dv, None, None, None, None
