"""benchmarks/common.py's case filter (--only) and report.py's table of a forced kernel variant (--isa)
against the full run: the README's AVX2-beside-AVX-512 figures come from these."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    # report.py imports `common` as the scripts do (their folder first on sys.path when run)
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


common = _load("common")
report = _load("report")


def test_only_parses_and_matches_values_as_text():
    only = common.parse_only(["suite=forward,forward_backward", "T=4096"])
    assert only == {"suite": {"forward", "forward_backward"}, "T": {"4096"}}
    assert common.matches({"suite": "forward", "T": 4096, "W": 8}, only)
    assert not common.matches({"suite": "forward", "T": 1024}, only)
    assert not common.matches({"suite": "forward"}, only)  # a case without the key never matches
    assert common.matches({"anything": 1}, {})


@pytest.mark.parametrize("bad", ["suite", "=x", "suite="])
def test_only_refuses_malformed_items(bad):
    with pytest.raises(ValueError, match="--only expects KEY=VALUE"):
        common.parse_only([bad])


def _doc(isa, results, only=None):
    return {"benchmark": "quantize", "device": "cpu", "labels": {"fastvq_cpp": "fastvq", "faiss": "faiss"},
            "only": only or {}, "case_keys": ["impl", "suite", "N"],
            "machine": {"cpu_isa": isa, "parallel": "pool", "git_commit": "abcdef0123"}, "results": results}


def _r(impl, n, t):
    return {"suite": "nearest_code", "impl": impl, "N": n, "median_s": t}


def test_isa_comparison_matches_cases_across_files():
    full = _doc("avx512", [_r("fastvq_cpp", 64, 1e-3), _r("faiss", 64, 2e-3), _r("fastvq_cpp", 128, 4e-3)])
    avx2 = _doc("avx2", [_r("fastvq_cpp", 64, 1.5e-3), _r("faiss", 64, 2e-3), _r("fastvq_cpp", 256, 1.0)],
                only={"N": ["64", "256"]})
    docs = [(Path("quantize_cpu.json"), full), (Path("quantize_cpu_avx2_subset.json"), avx2)]
    lines = report.isa_comparison(avx2, docs)
    rows = [line for line in lines if line.startswith("| suite=")]
    assert len(rows) == 2  # N=256 has no counterpart in the full run
    assert "1.50×" in rows[0] and "fastvq" in rows[0]
    assert "1.00×" in rows[1] and "faiss" in rows[1]
    assert "AVX2 + FMA / AVX-512 time" in "\n".join(lines)
    # the full run itself gets no such table, nor a forced run with nothing to compare against
    assert report.isa_comparison(full, docs) == []
    assert report.isa_comparison(avx2, [docs[1]]) == []


def test_header_names_the_kernel_variant():
    assert report.isa_text({"cpu_isa": "avx2"}) == "AVX2 + FMA kernels"
    assert report.isa_text({}) == "kernel variant not recorded"


def _rw(suite, height, t, **extra):
    return {"suite": suite, "impl": "fastvq_cpp", "height": height, "width": height, "T": height * height,
            "median_s": t, **extra}


def test_raster_scaling_verdict_comes_from_the_paired_rounds_when_measured():
    """The tables' medians (separate processes) say 4.8x; the paired blocks say 3.9x for 4.29x the
    window's pairs: the goal line judges 4 x 3.9 / 4.29 = 3.64x per 4x the work, and still shows
    the tables' figure."""
    results = [_rw("forward_backward", 64, 0.05), _rw("forward_backward", 128, 0.24)]
    doc = {"results": results}
    assert "(not met; from the tables' medians)" in report.rw_goals(doc)[2]
    paired = {"suite": "scaling", "impl": "fastvq_cpp", "mode": "forward_backward", "from_height": 64,
              "height": 128, "median_s": 0.19, "rounds": 7, "ratios": [3.7, 3.9, 4.1], "ratio_median": 3.9,
              "pairs_ratio": 4.29}
    line = report.rw_goals({"results": results + [paired]})[2]
    assert "forward + backward 64→128 3.90× for 4.29× the pairs = 3.64× per 4× (rounds 3.70–4.10) (met;" in line
    assert "separate processes: forward + backward 64→128 4.80×" in line
    slow = {**paired, "ratios": [4.9, 5.0], "ratio_median": 4.95}  # 4.62x per 4x the work
    assert "(not met; judged per 4×" in report.rw_goals({"results": results + [slow]})[2]
