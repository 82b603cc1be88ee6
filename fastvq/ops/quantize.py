"""The VQ op: nearest-codebook search, and quantization with a straight-through gradient.

Public:
  nearest_code(x, codebook, *, metric="l2", backend=None) -> (indices int64 (N,), distances fp32 (N,))
  vector_quantize(z, codebook, *, commitment_weight, codebook_weight, backend=None) -> (z_q, loss, indices)

`nearest_code_reference` is the oracle every backend is tested against. The backends compute the
same thing without ever holding an N x K distance matrix: codebook tiles stream past each block of
rows while a running (min, argmin) is kept. Ties go to the lowest index, as torch.argmin does.

Non-finite values, one rule on every backend: NaN, +inf or -inf anywhere in x (z) or the codebook
is refused with a ValueError naming the argument and its first bad row, checked in one min/max pass
before dispatch (a NaN row has no nearest code), so nothing is computed and no gradient is written.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._backend import cpp_ops, resolve_backend
from .._checks import FLOATS, check_finite, check_tensor

METRICS = ("l2", "cosine")
_SEARCH_DTYPES = FLOATS + (torch.float64,)  # fp64 is accepted for oracles and computed in fp32
_EPS = 1e-12  # floor on norms for the cosine metric, so zero vectors give distance 1, not NaN


# ----------------------------------------------------------------------------- input checks

def _check_search_inputs(x: torch.Tensor, codebook: torch.Tensor, metric: str, op: str = "nearest_code",
                         x_name: str = "x") -> None:
    check_tensor(op, x_name, x, ("N", "D"), _SEARCH_DTYPES)
    check_tensor(op, "codebook", codebook, ("K", "D"), _SEARCH_DTYPES)
    if codebook.shape[0] == 0:
        raise ValueError(f"{op}: codebook must have at least one entry, got shape {tuple(codebook.shape)}")
    if x.shape[1] != codebook.shape[1]:
        raise ValueError(f"{op}: x has D={x.shape[1]} but codebook has D={codebook.shape[1]}; they must match")
    if x.shape[1] == 0:
        raise ValueError(f"{op}: the vector dimension D must be at least 1, got shapes {tuple(x.shape)} and {tuple(codebook.shape)}")
    if x.device != codebook.device:
        raise ValueError(f"{op}: x is on {x.device} but codebook is on {codebook.device}; they must be on the same device")
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    # Last, as the only pass over the values: a NaN or inf row has no nearest code (backends would
    # return index 0, or K, with a NaN distance), so every backend refuses it before dispatch.
    check_finite(op, x_name, x)
    check_finite(op, "codebook", codebook)


# ----------------------------------------------------------------------------- torch reference

def nearest_code_reference(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", chunk_elems: int = 1 << 24):
    """Chunked, simple and exact in fp32 (fp64 stays fp64): the oracle for the fast backends."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf, cf = x.to(acc), codebook.to(acc)
    rows = max(1, chunk_elems // cf.shape[0])
    idx = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    dist = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    if metric == "l2":
        c_sq = cf.pow(2).sum(1)
    else:
        c_inv = 1.0 / cf.norm(dim=1).clamp_min(_EPS)
    for s in range(0, x.shape[0], rows):
        xb = xf[s:s + rows]
        dots = xb @ cf.t()
        if metric == "l2":
            d = (xb.pow(2).sum(1, keepdim=True) - 2 * dots + c_sq).clamp_min_(0)
        else:
            d = 1 - dots * c_inv / xb.norm(dim=1, keepdim=True).clamp_min(_EPS)
        best = d.min(dim=1).values
        # torch.min's index among ties depends on its vectorised path; pick the lowest explicitly.
        positions = torch.arange(d.shape[1], device=d.device).expand_as(d)
        idx[s:s + rows] = torch.where(d == best[:, None], positions, d.shape[1]).min(dim=1).values
        dist[s:s + rows] = best.clamp_min(0).to(torch.float32)
    return idx, dist


# ----------------------------------------------------------------------------- fused quantize + loss + straight-through

# The O(N D) epilogue (see QuantizeKernels): the torch pair is the reference; cpp and triton each do
# a direction in one pass over N x D.

def _gather_torch(z, codebook, idx):
    diff = codebook.index_select(0, idx).to(z.dtype) - z
    return z + diff, diff.float().pow(2).sum()


def _backward_torch(grad_out, z, codebook, idx, grad_loss, scale_z, scale_code, need_z, need_code):
    diff = codebook.index_select(0, idx).float() - z.float()
    grad_loss = grad_loss.float()
    grad_z = grad_codebook = None
    if need_z:
        grad_z = diff * (scale_z * grad_loss)
        if grad_out is not None:
            grad_z = grad_z + grad_out.float()
        grad_z = grad_z.to(z.dtype)
    if need_code:
        # index_put_ with accumulate is the segmented scatter-add; under
        # torch.use_deterministic_algorithms(True) torch runs it in a fixed order on CUDA.
        grad_codebook = torch.zeros(codebook.shape, dtype=torch.float32, device=codebook.device)
        grad_codebook.index_put_((idx,), diff * (scale_code * grad_loss), accumulate=True)
        grad_codebook = grad_codebook.to(codebook.dtype)
    return grad_z, grad_codebook


# ----------------------------------------------------------------------------- backends

class QuantizeKernels(NamedTuple):
    """One backend's entry points (unchecked: the public functions check first).

    search(x, codebook, metric) -> (indices int64 (N,), distances fp32 (N,))
    gather(z, codebook, idx) -> (z + (codebook[idx] - z), fp32 sum of (codebook[idx] - z)^2)
    backward(grad_out | None, z, codebook, idx, grad_loss, scale_z, scale_code, need_z, need_code)
        -> (grad_z, grad_codebook), with diff = codebook[idx] - z:
        grad_z = grad_out + scale_z * grad_loss * diff, grad_codebook[k] = scale_code * grad_loss * sum_{idx_i=k} diff_i
    fused_forward(z, codebook) -> (idx, out, sum of squared error), or None: search and gather as
        one pass, each block of rows gathered right after its search while it is still in cache.
    """
    search: Callable
    gather: Callable
    backward: Callable
    fused_forward: Callable | None = None


def _backward_cpp(grad_out, z, codebook, idx, grad_loss, scale_z, scale_code, need_z, need_code):
    gl = float(grad_loss)  # a CPU scalar: no device sync
    grad_z, grad_codebook = cpp_ops().vq_backward(grad_out, z, codebook, idx, scale_z * gl, scale_code * gl,
                                                  need_z, need_code)
    return (grad_z if need_z else None), (grad_codebook if need_code else None)


def _triton(name: str) -> Callable:
    """fastvq.kernels.quantize.<name>, imported at the first call (triton is optional)."""
    def run(*args):
        from fastvq.kernels import quantize

        return getattr(quantize, name)(*args)
    return run


KERNELS = {
    "torch": QuantizeKernels(nearest_code_reference, _gather_torch, _backward_torch),
    "cpp": QuantizeKernels(lambda x, cb, metric: cpp_ops().nearest_code(x, cb, metric == "cosine"),
                           lambda z, cb, idx: cpp_ops().vq_gather(z, cb, idx), _backward_cpp,
                           lambda z, cb: cpp_ops().vq_forward(z, cb)),
    "triton": QuantizeKernels(lambda x, cb, metric: _triton("nearest_code")(x, cb, metric == "cosine"),
                              _triton("vq_gather"), _triton("vq_backward")),
}


def _epilogue(backend: str, z, codebook) -> QuantizeKernels:
    # The fused kernels take one dtype; a codebook of another dtype keeps the reference path, whose
    # codebook gradient is computed from the codebook's own values.
    return KERNELS[backend if z.dtype == codebook.dtype else "torch"]


class VectorQuantizeFunction(torch.autograd.Function):
    """Search, gather, loss and straight-through in one node.

    Forward:  k = nearest(z), z_q = codebook[k]
              loss = (w_commit + w_code) * mean((z_q - z)^2)
              out  = z + (z_q - z)      (the value of taming's z + (z_q - z).detach())
    Backward: d out / d z = identity (straight-through)
              d loss / d z = -2 w_commit (z_q - z) / numel
              d loss / d codebook[k] += 2 w_code (z_q - z) / numel, a scatter-add by index
    Only z, the codebook and the indices are saved; z_q - z is recomputed (an O(N D) gather).
    No one-hot and no N x K matrix appear in either direction. After the search, each direction
    is one fused pass over N x D on the cpp and triton backends (see QuantizeKernels).
    """

    @staticmethod
    def forward(ctx, z, codebook, commitment_weight, codebook_weight, backend):
        z_, cb_ = z.detach(), codebook.detach()
        kernels = KERNELS[backend]
        if kernels.fused_forward is not None and z.dtype == codebook.dtype:
            idx, out, sq_sum = kernels.fused_forward(z_, cb_)
        else:
            idx, _ = kernels.search(z_, cb_, "l2")
            out, sq_sum = _epilogue(backend, z_, cb_).gather(z_, cb_, idx)
        loss = (commitment_weight + codebook_weight) * (sq_sum / z.numel())
        ctx.save_for_backward(z, codebook, idx)
        ctx.weights = (commitment_weight, codebook_weight)
        ctx.backend = backend
        ctx.mark_non_differentiable(idx)
        return out, loss, idx

    @staticmethod
    def backward(ctx, grad_out, grad_loss, _grad_idx):
        z, codebook, idx = ctx.saved_tensors
        w_commit, w_code = ctx.weights
        z, codebook = z.detach(), codebook.detach()
        if grad_loss is None:
            grad_loss = torch.zeros((), dtype=torch.float32, device=z.device)
        # d loss / d diff = 2 (w_commit + w_code) diff / numel: -w_commit's share goes to z, w_code's to the codebook.
        scale = 2.0 / z.numel()
        grad_z, grad_codebook = _epilogue(ctx.backend, z, codebook).backward(
            grad_out, z, codebook, idx, grad_loss, -w_commit * scale, w_code * scale,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return grad_z, grad_codebook, None, None, None


# ----------------------------------------------------------------------------- public

def nearest_code(x: torch.Tensor, codebook: torch.Tensor, *, metric: str = "l2", backend: str | None = None):
    """Index and distance of the nearest codebook entry for every row of x.

    No N x K matrix is allocated by the cpp and triton backends: codebook tiles stream past each
    block of rows with a running (min, argmin). Accumulation is always fp32 (no TF32).

    Args:
        x: (N, D) float32, float16 or bfloat16 (float64 accepted, computed in fp32), finite.
        codebook: (K, D), K >= 1, on x's device, finite.
        metric: "l2" (squared Euclidean distance) or "cosine" (one minus the cosine similarity).
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        (indices int64 (N,), distances float32 (N,)); ties go to the lowest index, distances are
        clamped at 0.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, rank, dtype, D or metric;
        ValueError naming x or codebook and its first row holding NaN or +-inf (on every backend:
        one min/max pass before dispatch, next to the O(N K D) search);
        RuntimeError when the backend asked for cannot run here (and why).

    Example:
        >>> x, codebook = torch.randn(1000, 64), torch.randn(512, 64)
        >>> idx, dist = fastvq.nearest_code(x, codebook)
        >>> idx.shape, dist.dtype
        (torch.Size([1000]), torch.float32)
    """
    _check_search_inputs(x, codebook, metric)
    name = resolve_backend(backend, x.device, "nearest_code")
    if x.shape[0] == 0:
        return (torch.empty(0, dtype=torch.int64, device=x.device), torch.empty(0, dtype=torch.float32, device=x.device))
    return KERNELS[name].search(x, codebook, metric)


def vector_quantize(z: torch.Tensor, codebook: torch.Tensor, *, commitment_weight: float = 0.25,
                    codebook_weight: float = 1.0, backend: str | None = None):
    """Quantize rows of z to their nearest codebook rows with a straight-through gradient.

    Search, gather, loss and straight-through run as one autograd node (VectorQuantizeFunction);
    taming's VectorQuantizer2(legacy=True) is commitment_weight=1, codebook_weight=beta.

    Args:
        z: (N, D) float tensor, N >= 1, finite.
        codebook: (K, D) on z's device, finite.
        commitment_weight: weight of ||z - sg[z_q]||^2 (gradient to z).
        codebook_weight: weight of ||sg[z] - z_q||^2 (gradient to the codebook).
        backend: "auto" (default, or $FASTVQ_BACKEND), "torch", "cpp" or "triton".

    Returns:
        (z_q (N, D) in z's dtype, loss fp32 scalar, indices int64 (N,)): z_q has the codes' values
        and passes its gradient to z unchanged; both loss terms are means over all elements.

    Raises:
        TypeError / ValueError naming the argument (as nearest_code; an empty z); ValueError naming
        z or codebook and its first row holding NaN or +-inf, before anything is computed;
        RuntimeError when the backend asked for cannot run here.

    Example:
        >>> z = torch.randn(256, 16, requires_grad=True)
        >>> codebook = torch.randn(128, 16, requires_grad=True)
        >>> z_q, loss, idx = fastvq.vector_quantize(z, codebook, commitment_weight=0.25)
        >>> (z_q.sum() + loss).backward()
    """
    _check_search_inputs(z, codebook, "l2", op="vector_quantize", x_name="z")
    name = resolve_backend(backend, z.device, "vector_quantize")
    if z.shape[0] == 0:
        raise ValueError("vector_quantize: z must have at least one row (the loss is a mean over z)")
    return VectorQuantizeFunction.apply(z, codebook, float(commitment_weight), float(codebook_weight), name)
