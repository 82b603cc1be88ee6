"""The cpp kernels' variants per instruction set (csrc/isa.h): which ones this CPU runs, how one is
chosen (the best, or FASTVQ_CPU_ISA), and that switching changes the code that runs but not the
results beyond rounding. The kernel test files run their cpp cases once per variant (conftest.py).
"""
import os
import platform
import shutil
import subprocess
import sys

import pytest
import torch

import fastvq
from fastvq import _backend
from helpers import assert_close, requires

pytestmark = requires("cpp")

# What each level needs, in /proc/cpuinfo's words ("abm" is LZCNT), as csrc/isa.cpp checks it.
NEEDS = {
    "avx2": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "popcnt"},
    "avx512": {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "abm", "popcnt",
               "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def cpuinfo_flags() -> set:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
                    reason="compares with Linux's /proc/cpuinfo on x86-64")
def test_runnable_variants_match_cpuinfo():
    flags = cpuinfo_flags()
    expected = tuple(isa for isa in ("avx512", "avx2") if NEEDS[isa] <= flags) + ("baseline",)
    assert _backend.cpu_isas() == expected, f"cpuinfo flags: {sorted(f for f in flags if 'avx' in f)}"


def test_best_variant_runs_unless_one_is_requested():
    if _backend.requested_cpu_isa() is not None:
        pytest.skip("FASTVQ_CPU_ISA is set for this session")
    status = fastvq.available_backends()["cpp"]
    assert status.isa == _backend.cpu_isa() == _backend.cpu_isas()[0]
    assert status.isa in status.reason


def test_environment_variable_is_read_when_the_extension_loads():
    code = "import fastvq; s = fastvq.available_backends()['cpp']; print(s.isa); print(s.reason)"
    env = dict(os.environ, FASTVQ_CPU_ISA="baseline")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    isa, reason = out.stdout.splitlines()[-2:]
    assert isa == "baseline" and "baseline variant" in reason


def test_set_cpu_isa_switches_and_returns_the_previous():
    start = _backend.cpu_isa()
    for isa in _backend.cpu_isas():
        previous = _backend.set_cpu_isa(isa)
        try:
            assert fastvq.available_backends()["cpp"].isa == isa == _backend.cpu_isa()
        finally:
            assert _backend.set_cpu_isa(previous) == isa
    assert _backend.cpu_isa() == start


class FakeExtension:
    def __init__(self, runnable, compiled):
        self.runnable, self.compiled = runnable, compiled

    def cpu_isas(self):
        return self.runnable

    def compiled_isas(self):
        return self.compiled

    def set_cpu_isa(self, name):  # pragma: no cover - every request here is refused before
        raise AssertionError(f"set_cpu_isa({name!r}) reached the extension")


@pytest.mark.parametrize("value, runnable, compiled, exc, words", [
    ("sse9", ["baseline"], ["avx512", "avx2", "baseline"], ValueError, "must be one of avx512, avx2, baseline, got 'sse9'"),
    ("avx512", ["avx2", "baseline"], ["avx512", "avx2", "baseline"], RuntimeError, "this CPU lacks"),
    ("AVX2", ["baseline"], ["baseline"], RuntimeError, "no such kernels"),
])
def test_a_request_that_cannot_run_raises_naming_the_variable(monkeypatch, value, runnable, compiled, exc, words):
    monkeypatch.setattr(_backend, "_isa_module", lambda: FakeExtension(runnable, compiled))
    monkeypatch.setenv("FASTVQ_CPU_ISA", value)
    with pytest.raises(exc, match="FASTVQ_CPU_ISA") as err:
        _backend._apply_isa_request()
    assert words in str(err.value)


def test_the_extension_refuses_unknown_variants():
    import fastvq._C as C

    with pytest.raises(ValueError, match="unknown kernel ISA 'sse9'"):
        C.set_cpu_isa("sse9")
    with pytest.raises(ValueError, match="isa must be one of"):
        _backend.set_cpu_isa("neon")


def test_variants_differ_in_rounding_only():
    """Every variant matches the best one to fp32 tolerance; the baseline (no FMA) differs from it in
    the last bits, which shows the switch reaches the kernels."""
    isas = _backend.cpu_isas()
    if len(isas) < 2:
        pytest.skip(f"one variant runs here: {isas}")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 300, 64, generator=gen) for _ in range(3))
    x, cb = torch.randn(500, 48, generator=gen), torch.randn(300, 48, generator=gen)
    results = {}
    previous = _backend.cpu_isa()
    try:
        for isa in isas:
            _backend.set_cpu_isa(isa)
            out = fastvq.sliding_window_attention(q, k, v, window=70, backend="cpp")
            idx, dist = fastvq.nearest_code(x, cb, backend="cpp")
            results[isa] = (out, idx, dist)
    finally:
        _backend.set_cpu_isa(previous)
    best = results[isas[0]]
    for isa in isas[1:]:
        assert_close(results[isa][0], best[0], msg=f"{isa} vs {isas[0]}: attention")
        assert torch.equal(results[isa][1], best[1]), f"{isa} vs {isas[0]}: nearest codes differ"
        assert_close(results[isa][2], best[2], msg=f"{isa} vs {isas[0]}: distances")
    assert not torch.equal(results["baseline"][0], best[0]), "the baseline variant gave the best one's exact bits"


# Instructions beyond x86-64's baseline: VEX / EVEX encoded ones (v..., AVX-512's k... mask moves)
# and the BMI / LZCNT / POPCNT / MOVBE ones the AVX2 level enables.
BEYOND_BASELINE = {"andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx", "sarx", "shlx",
                   "shrx", "tzcnt", "lzcnt", "popcnt", "movbe"}


def merged_functions_beyond_baseline(library):
    """Demangled names of the functions with global or weak binding (the copies the linker merges
    across translation units) whose code uses instructions beyond the x86-64 baseline."""
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", library], capture_output=True, text=True,
                                 check=True).stdout
    using, current = set(), None
    for line in disassembly.splitlines():
        if line.endswith(">:"):
            current = line[line.index("<") + 1:-2]
        elif current and "\t" in line:
            mnemonic = line.split("\t")[1].split(" ")[0]
            if mnemonic[:1] in ("v", "k") or mnemonic in BEYOND_BASELINE:
                using.add(current)
    symbols = subprocess.run(["readelf", "-sW", library], capture_output=True, text=True, check=True).stdout
    merged = {parts[7].split("@")[0] for parts in map(str.split, symbols.splitlines())
              if len(parts) >= 8 and parts[3] == "FUNC" and parts[4] in ("GLOBAL", "WEAK") and parts[6] != "UND"}
    names = sorted(using & merged)
    demangled = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return demangled.splitlines()


@pytest.mark.skipif(platform.machine() != "x86_64" or not all(map(shutil.which, ("objdump", "readelf", "c++filt"))),
                    reason="inspects an x86-64 build with binutils (objdump, readelf, c++filt)")
def test_merged_functions_are_baseline_code():
    """An inline function or template instance compiled into several variants is kept once by the
    linker, and baseline code may call the kept copy: it must hold no AVX code. Only the variants'
    own namespaces (csrc/isa.h) may (a -march=native build fails this: std::vector's growth path,
    torch's schema helpers, ... in AVX-512)."""
    import fastvq._C as C

    if "avx2" not in C.compiled_isas():
        pytest.skip("a build without the x86 variants")
    offenders = [name for name in merged_functions_beyond_baseline(C.__file__)
                 if "::isa_avx2::" not in name and "::isa_avx512::" not in name]
    assert not offenders, f"{len(offenders)} merged functions hold AVX code: {offenders[:10]}"
