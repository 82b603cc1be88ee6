"""Every Triton kernel compiles for sm_80 and sm_90 without a GPU, with every config its launch
wrapper or autotuner may choose, through the real compiler pipeline down to a cubin (the ptxas
bundled in the triton wheel). The compile is benchmarks/triton_compile.py's --quick subset (each
launch config at least once, in the main dtypes; the script alone covers every dtype and shape and
records registers, spills and shared memory in benchmarks/results/triton_compile.json). A compile
error, or a kernel needing more shared memory than the target has per block, fails the test of
that kernel and target. Spills are recorded there, not asserted: they cost speed, not correctness.

The compiles run in subprocesses with TRITON_INTERPRET=0 (the kernels modules read the flag when
imported, and conftest.py sets it for this process), one per target, side by side: about a minute
of CPU each.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed: there are no Triton kernels to compile")

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "triton_compile.py"
_spec = importlib.util.spec_from_file_location("triton_compile", _SCRIPT)
triton_compile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(triton_compile)

KERNELS = [(op, kernel) for op, kernels in triton_compile.kernel_names().items() for kernel in kernels]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return triton_compile.compile_all(quick=True, timeout_s=900)


def test_every_op_has_kernels():
    assert {op for op, _ in KERNELS} >= {"quantize", "window_attention", "sampling", "decode_linear", "raster_window"}


@pytest.mark.parametrize("target", sorted(triton_compile.TARGETS), ids=lambda arch: f"sm_{arch}")
@pytest.mark.parametrize("op, kernel", KERNELS, ids=[f"{op}.{kernel}" for op, kernel in KERNELS])
def test_compiles(compiled, op, kernel, target):
    name = f"sm_{target}"
    crashed = [r["error"] for r in compiled if r["target"] == name and r["op"] == op and r["kernel"] is None]
    assert not crashed, f"the {name} compile worker failed: {crashed[0]}"
    records = [r for r in compiled if r["target"] == name and r["op"] == op and r["kernel"] == kernel]
    assert records, f"no workload in benchmarks/triton_compile.py launches {op}.{kernel}: add one to _workloads()"
    failed = [f"[{r.get('workload')}; {r.get('config')}; {r.get('role')}] {r['error']}" for r in records if not r["ok"]]
    assert not failed, f"{op}.{kernel} for {name}:\n" + "\n".join(failed)
    for r in records:  # the ptxas report was read: the JSON's numbers are real
        assert r["n_regs"] > 0 and r["spill_store_bytes"] is not None and r["shared"] >= 0, r
