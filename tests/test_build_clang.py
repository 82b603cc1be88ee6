"""csrc/ builds with clang as well as GCC, for every kernel variant, and its baseline is portable.

setup.py builds the extension with the system compiler, GCC here; a GCC-only construct (such as
__builtin_shuffle) would break every clang build (macOS, or CXX=clang++). Each csrc/*.cpp is
compiled to an object with clang++ against the installed torch's headers at -O0 (code generation
runs: inline asm constraints, intrinsics, target regions, but costs little), and each kernel file
(one with FASTVQ_KERNEL lines, csrc/isa.h) also as setup.py builds its AVX-512 variant, through
setup.py's own wrapper; the AVX2 variant's own code (the #if branches of vec.h and
quantize_kernel.h) is compiled through quantize.cpp, which saves half a minute. The language
standard is setup.py's rule for the installed torch (tested here too). torch/extension.h is parsed
once into a precompiled header, which halves the time a file takes. Every source's baseline is
also parsed for aarch64 (`--target=aarch64-linux-gnu -fsyntax-only` on the host's headers, with two
glibc headers that pick 32-bit x86 without __x86_64__ stood in for), which shows that the portable
path holds none of the x86 intrinsics vec.h and quantize_kernel.h keep under #if, nor cpuid
(isa.cpp) or x86 pause (parallel.cpp); that check skips where clang cannot parse a plain C++ file
that way.
`make test` installs clang where it can (as root with apt-get); elsewhere these tests skip and say so.
"""
import ast
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
SOURCES = sorted(name for name in os.listdir(CSRC) if name.endswith(".cpp"))
CLANG = shutil.which("clang++")

needs_clang = pytest.mark.skipif(
    CLANG is None, reason="clang++ is not on PATH (Debian: apt-get install clang; `make test` installs it as root)"
)


def from_setup(*names, torch=None):
    """setup.py's top-level functions and constants `names` (setup.py itself cannot be imported: it
    runs setup()), so these tests build with the build's own rules; `torch` replaces the module."""
    if torch is None:
        import torch
    path = os.path.join(ROOT, "setup.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    wanted = [node for node in tree.body
              if (isinstance(node, ast.FunctionDef) and node.name in names)
              or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets))]
    scope = {"os": os, "re": re, "torch": torch}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), path, "exec"), scope)
    return [scope[name] for name in names]


def is_kernel(source):
    with open(os.path.join(CSRC, source)) as f:
        return "\nFASTVQ_KERNEL(" in f.read()


KERNELS = [source for source in SOURCES if is_kernel(source)]


def clang_flags():
    from torch.utils.cpp_extension import include_paths

    (cxx_standard,) = from_setup("_cxx_standard")
    headers = include_paths() + [sysconfig.get_paths()["include"]]
    # setup.py's flags but -O0; no -fopenmp: clang builds run every region on csrc/parallel.h's pool
    return [
        CLANG, cxx_standard(), "-O0", "-fPIC", "-fno-math-errno", "-DFASTVQ_MULTI_ISA",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
        *[arg for path in headers for arg in ("-isystem", path)],
    ]  # fmt: skip


def run(cmd, what):
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"clang++ failed on {what}:\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def torch_pch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clang_pch")
    header = folder / "torch_extension.h"
    header.write_text("#include <torch/extension.h>\n")
    pch = folder / "torch_extension.h.pch"
    run([*clang_flags(), "-x", "c++-header", str(header), "-o", str(pch)], "torch/extension.h (precompiled header)")
    return pch


@pytest.mark.parametrize("version, standard", [
    ("2.6.0", "-std=c++17"), ("2.13.0+cpu", "-std=c++17"), ("2.14.0", "-std=c++20"),
    ("2.14.0.dev20260101+cpu", "-std=c++20"), ("2.15.1+cu130", "-std=c++20"), ("3.0.0", "-std=c++20"),
])
def test_cxx_standard_follows_torch(version, standard):
    """torch 2.14's headers #error below C++20; older ones are built with C++17."""
    from types import SimpleNamespace

    (cxx_standard,) = from_setup("_cxx_standard", torch=SimpleNamespace(__version__=version))
    assert cxx_standard() == standard


@needs_clang
def test_every_source_is_checked():
    assert {"window_attention.cpp", "window_attention_decode.cpp", "sampling.cpp", "isa.cpp"} <= set(SOURCES), SOURCES
    assert {"quantize.cpp", "window_attention.cpp", "decode_linear.cpp", "sampling.cpp"} <= set(KERNELS), KERNELS


CASES = ([pytest.param(source, None, id=source) for source in SOURCES]
         + [pytest.param(source, "avx512", id=f"{source}-avx512") for source in KERNELS]
         + [pytest.param("quantize.cpp", "avx2", id="quantize.cpp-avx2")])
# parsed for aarch64 (see the module docstring): every source, all at once (aarch64_parsed)
PORTABLE_CHECKED = SOURCES


def compile_case(source, isa, pch, folder):
    """(object file, clang's exit status and stderr) of one case."""
    path = os.path.join(CSRC, source)
    if isa is not None:  # the wrapper setup.py compiles for this variant
        variants, variant_source = from_setup("ISA_VARIANTS", "_variant_source")
        path = variant_source(isa, dict(variants)[isa], path, str(folder))
    out = folder / f"{source}.{isa or 'baseline'}.o"
    result = subprocess.run([*clang_flags(), "-include-pch", str(pch), "-c", path, "-o", str(out)],
                            capture_output=True, text=True)
    return out, result.returncode, f"{path} ({isa or 'baseline'}):\n{result.stderr[-6000:]}"


def all_at_once(fn, items) -> dict:
    """{item: fn(item)}, one item per core at a time: each clang takes 6-15 s of one core, and the
    rest of the suite leaves the other cores idle meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=cores) as pool:
        return dict(zip(items, pool.map(fn, items)))


@pytest.fixture(scope="module")
def compiled(torch_pch, tmp_path_factory):
    """Every case compiled at once (all_at_once)."""
    folder = tmp_path_factory.mktemp("clang_objects")
    return all_at_once(lambda case: compile_case(*case, torch_pch, folder), [p.values for p in CASES])


@needs_clang
@pytest.mark.parametrize("source, isa", CASES)
def test_compiles_with_clang(source, isa, compiled):
    out, status, stderr = compiled[(source, isa)]
    assert status == 0, f"clang++ failed on {stderr}"
    assert out.stat().st_size > 0


def aarch64_flags(overlay):
    """clang flags that parse C++ for aarch64 with this machine's headers (x86-64's: what torch and
    csrc use of them is the same on both), `overlay` standing in for the two that differ."""
    from torch.utils.cpp_extension import include_paths

    (cxx_standard,) = from_setup("_cxx_standard")
    host = subprocess.run(["g++", "-print-multiarch"], capture_output=True, text=True).stdout.strip() or "x86_64-linux-gnu"
    gxx = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout.strip().split(".")[0]
    system = [f"/usr/include/c++/{gxx}", f"/usr/include/{host}/c++/{gxx}", f"/usr/include/{host}", "/usr/include"]
    headers = include_paths() + [sysconfig.get_paths()["include"]]
    return [CLANG, "--target=aarch64-linux-gnu", "-fsyntax-only", "-nostdinc++", "-nostdlibinc", cxx_standard(),
            "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
            *[arg for path in [str(overlay)] + system + headers for arg in ("-isystem", path)]]


@pytest.fixture(scope="module")
def aarch64(tmp_path_factory):
    folder = tmp_path_factory.mktemp("aarch64")
    # x86-64 glibc picks its 32-bit variants of these when __x86_64__ is not defined
    (folder / "gnu").mkdir()
    (folder / "gnu" / "stubs-32.h").write_text("")
    (folder / "bits").mkdir()
    (folder / "bits" / "wordsize.h").write_text(
        "#define __WORDSIZE 64\n#define __WORDSIZE_TIME64_COMPAT32 1\n#define __SYSCALL_WORDSIZE 64\n")
    probe = folder / "probe.cpp"
    probe.write_text("#include <vector>\n#include <cmath>\n#if !defined(__aarch64__) || defined(__x86_64__)\n"
                     "#error not aarch64\n#endif\nstatic_assert(sizeof(long) == 8);\n")
    flags = aarch64_flags(folder)
    result = subprocess.run([*flags, str(probe)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"clang cannot parse C++ for aarch64 with this machine's headers: {result.stderr[-300:]}")
    return flags


@pytest.fixture(scope="module")
def aarch64_parsed(aarch64):
    """Every PORTABLE_CHECKED file parsed for aarch64 at once (all_at_once)."""
    return all_at_once(lambda source: subprocess.run([*aarch64, os.path.join(CSRC, source)], capture_output=True,
                                                     text=True), PORTABLE_CHECKED)


@needs_clang
@pytest.mark.parametrize("source", PORTABLE_CHECKED)
def test_baseline_parses_for_aarch64(source, aarch64_parsed):
    result = aarch64_parsed[source]
    assert result.returncode == 0, f"csrc/{source} for aarch64 failed:\n{result.stderr[-6000:]}"
