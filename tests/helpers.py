"""What every test file shares: which backends run here, where their tensors live, and how closely a
result must match its reference (one tolerance table per dtype).

Import as `from helpers import ...` (pyproject.toml puts tests/ on the path). The `backend` and
`fast_backend` fixtures in conftest.py are built on `backend_params`; a test that parametrizes
backends together with other arguments in one `@pytest.mark.parametrize` uses `backend_params` too,
and a test for a single backend uses `@requires("cpp")`. Every skip says why, in the words of
`fastvq.available_backends()`.
"""
from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch

import fastvq

BACKENDS = ("torch", "cpp", "triton")
FAST_BACKENDS = ("cpp", "triton")


# ----------------------------------------------------------------------------- which backends run here

def unavailable(backend: str) -> str | None:
    """Why `backend` cannot run on this machine (fastvq.available_backends()'s reason), or None."""
    status = fastvq.available_backends()[backend]
    return None if status.available else f"backend {backend!r} unavailable: {status.reason}"


def requires(backend: str):
    """A skipif mark for a test of one backend: `@requires("cpp")`."""
    reason = unavailable(backend)
    return pytest.mark.skipif(reason is not None, reason=reason or f"backend {backend!r} available")


def skip_unavailable(backend: str) -> None:
    """Skip the running test (with the reason) when `backend` cannot run here."""
    reason = unavailable(backend)
    if reason is not None:
        pytest.skip(reason)


def backend_params(backends=BACKENDS) -> list:
    """pytest.param per backend, id = its name (so `-k cpp` selects it), skipped with the reason
    when it cannot run here: for `@pytest.mark.parametrize("backend", backend_params())`."""
    return [pytest.param(name, id=name, marks=() if unavailable(name) is None else requires(name)) for name in backends]


def device_of(backend: str) -> str:
    """Where the backend's tensors live: triton on the GPU where there is one, else (and every
    other backend) on the CPU; triton on CPU tensors runs through the interpreter."""
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def interpreted(backend: str) -> bool:
    """Triton through TRITON_INTERPRET on the CPU: slow, so give it small shapes."""
    return backend == "triton" and device_of(backend) == "cpu"


# ----------------------------------------------------------------------------- tolerances

# The default tolerance of a comparison done in each dtype. fp32: a reordered fp32 accumulation;
# fp16 / bf16: about an ulp of the output (a kernel may be about 2x the error of torch doing the same
# computation in that dtype; pass yardstick= to assert_close to check that rule exactly);
# fp64: two fp64 computations of the same thing (taming's modules in double).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
}


def tolerance(dtype: torch.dtype) -> dict:
    """{"rtol", "atol"} for a result computed in `dtype` (exact for integer and bool tensors)."""
    if dtype in TOLERANCES:
        return dict(TOLERANCES[dtype])
    if not (dtype.is_floating_point or dtype.is_complex):
        return dict(rtol=0.0, atol=0.0)
    raise KeyError(f"no tolerance for {dtype}; add it to helpers.TOLERANCES")


def assert_close(actual, expected, *, dtype: torch.dtype | None = None, yardstick=None,
                 rtol: float | None = None, atol: float | None = None, equal_nan: bool = False, msg=None):
    """actual matches expected within the tolerance of `dtype`.

    dtype: the precision the result was computed in. None: actual's dtype, and the two must have the
        same dtype. Given: the two are compared in float64 whatever their dtypes (an fp16 kernel
        against an fp32 oracle: `assert_close(out, ref, dtype=torch.float16)`).
    yardstick: torch's result of the same computation done in `dtype`; then the rule is the
        project's "at most about 2x torch's error": max|actual - expected| <= 2 max|yardstick -
        expected| + 2 eps(dtype) max(|expected|, 1). (rtol / atol do not apply.)
    rtol, atol: override the table's values for this comparison (either or both).
    msg: a string put in front of the failure message (or, as in torch.testing, a callable).
    Tensors on different devices are compared on the CPU; mappings, lists and tuples element-wise.
    """
    if isinstance(actual, Mapping):
        assert isinstance(expected, Mapping) and set(actual) == set(expected), \
            f"keys differ: {sorted(map(str, actual))} vs {sorted(map(str, expected))}"
        for key in actual:
            assert_close(actual[key], expected[key], dtype=dtype, yardstick=None if yardstick is None else yardstick[key],
                         rtol=rtol, atol=atol, equal_nan=equal_nan, msg=f"{msg}: {key}" if isinstance(msg, str) else str(key))
        return
    if isinstance(actual, (list, tuple)):
        assert isinstance(expected, (list, tuple)) and len(actual) == len(expected), \
            f"lengths differ: {len(actual)} vs {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(a, e, dtype=dtype, yardstick=None if yardstick is None else yardstick[i],
                         rtol=rtol, atol=atol, equal_nan=equal_nan, msg=f"{msg}: item {i}" if isinstance(msg, str) else f"item {i}")
        return
    actual = torch.as_tensor(actual)
    if not isinstance(expected, torch.Tensor):  # a Python number: in actual's dtype
        expected = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device)
    if actual.device != expected.device:
        actual, expected = actual.cpu(), expected.cpu()
    prefix = f"{msg}: " if isinstance(msg, str) else ""
    if yardstick is not None:
        if dtype is None:
            dtype = actual.dtype
        assert actual.shape == expected.shape == yardstick.shape, \
            f"{prefix}shapes differ: {tuple(actual.shape)}, {tuple(expected.shape)}, yardstick {tuple(yardstick.shape)}"
        want = expected.double()
        scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
        torch_err = (yardstick.to(want.device).double() - want).abs().max().item() if want.numel() else 0.0
        err = (actual.double() - want).abs().max().item() if want.numel() else 0.0
        tol = 2 * torch_err + 2 * torch.finfo(dtype).eps * scale
        assert err <= tol, f"{prefix}max error {err:.3g} > tolerance {tol:.3g} (torch in {dtype}: {torch_err:.3g})"
        return
    check_dtype = dtype is None
    tol = tolerance(actual.dtype if dtype is None else dtype)
    if rtol is not None:
        tol["rtol"] = rtol
    if atol is not None:
        tol["atol"] = atol
    if not check_dtype and (actual.dtype != expected.dtype):
        actual, expected = actual.double(), expected.double()
    if isinstance(msg, str):
        msg = (lambda text, _prefix=msg: f"{_prefix}: {text}")
    torch.testing.assert_close(actual, expected, check_dtype=check_dtype, equal_nan=equal_nan, msg=msg, **tol)
