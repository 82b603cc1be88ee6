"""The weights a decode step reads, as an explicit object kept beside a module (never in its state dict).

A decode step multiplies a handful of rows by every weight of the model, so its time is the time to
stream the weights from memory. Two things make that stream faster, and both need the weights laid
out differently from the parameters:
  * query, key and value as one (3 C, C) matrix: one product and one call a layer instead of three;
  * on CPU, weights in transparent huge pages: on 4 KiB pages the stream also walks the page tables
    (a TLB miss every page), 2 MiB pages remove most of those walks.
The parameters stay where torch put them (state_dict, optimisers and .to() keep working): a
DecodeWeights holds copies, built on first use and rebuilt when any source parameter is replaced or
changed in place (data_ptr and version counter; writes through .data bypass the counter: call
invalidate() after those). On CPU this holds a second copy of the decode weights while sampling;
`invalidate()` (or `del`) gives it back.
"""
from __future__ import annotations

import ctypes
import functools
import sys
from typing import Callable, NamedTuple

import torch

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None off Linux (the advice is then skipped: plain pages, same results)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


def packed_in_huge_pages(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contiguous copies of tensors of one dtype, laid end to end in one buffer. On CPU the buffer's
    2 MiB-aligned span is advised MADV_HUGEPAGE (advice only: the kernel may decline, the copies are
    the same); elsewhere they are plain contiguous copies."""
    dtype, device, item = tensors[0].dtype, tensors[0].device, tensors[0].element_size()
    total = sum(t.numel() for t in tensors)
    if device.type != "cpu":
        buf = torch.empty(total, dtype=dtype, device=device)
    else:
        raw = torch.empty(total + _HUGE_PAGE // item, dtype=dtype)  # room to start on a 2 MiB boundary
        start = -raw.data_ptr() % _HUGE_PAGE // item
        buf = raw[start:start + total]
        advise, span = _madvise(), total * item // _HUGE_PAGE * _HUGE_PAGE
        if advise is not None and span:
            advise(buf.data_ptr(), span, _MADV_HUGEPAGE)  # before the copy: the first touch allocates the pages
    copies, offset = [], 0
    for t in tensors:
        copies.append(buf[offset:offset + t.numel()].view(t.shape).copy_(t))
        offset += t.numel()
    return tuple(copies)


class ParameterSlots:
    """A module's parameters read through their (submodule, name) slots, listed once: calling it
    costs one dict lookup a parameter, where module.parameters() walks the module tree (about
    0.8 ms a decode step for an 8-layer GPT, a tenth of the step). A parameter replaced in its
    slot (module.weight = nn.Parameter(...), load_state_dict(assign=True)) is seen; submodules
    added after the first call are not (free_decode_weights() after such surgery)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self._slots = module, None

    def __call__(self) -> tuple[torch.Tensor, ...]:
        if self._slots is None:
            self._slots = [(m._parameters, name) for m in self.module.modules() for name in m._parameters
                           if m._parameters[name] is not None]
        return tuple(params[name] for params, name in self._slots)

    def reset(self) -> None:
        self._slots = None

    def __getstate__(self):
        return {"module": self.module, "_slots": None}


class DecodeWeights:
    """build() -> the decode step's tensors, cached until a parameter of `sources()` changes.

    sources: returns the parameters the copies are made from (read every call: a cheap stamp of
    their data pointers and version counters decides whether to rebuild). build: makes the copies,
    outside autograd.
    """

    def __init__(self, sources: Callable[[], tuple[torch.Tensor, ...]], build: Callable[[], object]):
        self._sources, self._build = sources, build
        self._stamp, self._value = None, None

    def get(self):
        stamp = tuple((p.data_ptr(), p._version) for p in self._sources())
        if stamp != self._stamp:
            with torch.no_grad():
                self._value = self._build()
            self._stamp = stamp
        return self._value

    def __getstate__(self):
        # copies are derived data: a pickled or deep-copied module rebuilds its own
        return {"_sources": self._sources, "_build": self._build, "_stamp": None, "_value": None}

    def invalidate(self) -> None:
        """Drop the copies (memory back; rebuilt at the next get()) and relist the sources."""
        self._stamp, self._value = None, None
        if isinstance(self._sources, ParameterSlots):
            self._sources.reset()


class AttentionDecodeWeights(NamedTuple):
    """What an attention decode step reads: query/key/value weights stacked ((C + 2 C_kv), C) with
    their biases, and the output projection (huge-page copies on CPU)."""
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor
    proj_weight: torch.Tensor
    proj_bias: torch.Tensor


def _attention_sources(attn: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    return (attn.query.weight, attn.key.weight, attn.value.weight, attn.proj.weight,
            attn.query.bias, attn.key.bias, attn.value.bias, attn.proj.bias)


def _stack_attention(attn: torch.nn.Module) -> AttentionDecodeWeights:
    wq, wk, wv, wp, bq, bk, bv, bp = _attention_sources(attn)
    qkv, proj = packed_in_huge_pages(torch.cat((wq, wk, wv)), wp)
    return AttentionDecodeWeights(qkv, torch.cat((bq, bk, bv)), proj, bp.detach())


def attention_decode_weights(attn: torch.nn.Module) -> DecodeWeights:
    """The DecodeWeights of an attention module whose query, key, value and proj are nn.Linear
    layers with biases (SlidingWindowSelfAttention, RasterWindowSelfAttention): get() gives an
    AttentionDecodeWeights. Partials of module-level functions, not closures, so that a pickled or
    deep-copied module's copies follow its own parameters, not the original's."""
    return DecodeWeights(functools.partial(_attention_sources, attn), functools.partial(_stack_attention, attn))
