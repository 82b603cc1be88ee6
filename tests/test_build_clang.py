"""csrc/ builds with clang as well as GCC.

setup.py builds the extension with the system compiler, GCC here; a GCC-only construct (such as
__builtin_shuffle) would break every clang build (macOS, or CXX=clang++). Each csrc/*.cpp is
compiled to an object with clang++ against the installed torch's headers, with setup.py's language
and target flags at -O0: code generation runs (inline asm constraints, intrinsics) but costs little.
torch/extension.h is parsed once into a precompiled header, which halves the time a file takes.
`make test` installs clang where it can (as root with apt-get); elsewhere these tests skip and say so.
"""
import os
import shutil
import subprocess
import sysconfig

import pytest

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
SOURCES = sorted(name for name in os.listdir(CSRC) if name.endswith(".cpp"))
CLANG = shutil.which("clang++")

pytestmark = pytest.mark.skipif(
    CLANG is None, reason="clang++ is not on PATH (Debian: apt-get install clang; `make test` installs it as root)"
)


def clang_flags():
    from torch.utils.cpp_extension import include_paths

    headers = include_paths() + [sysconfig.get_paths()["include"]]
    # setup.py's flags but -O0; no -fopenmp: clang builds use csrc/parallel.h's std::thread path
    return [
        CLANG, "-std=c++17", "-O0", "-fPIC", "-fno-math-errno", "-march=native",
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


def test_every_source_is_checked():
    assert {"window_attention.cpp", "window_attention_decode.cpp", "sampling.cpp"} <= set(SOURCES), SOURCES


@pytest.mark.parametrize("source", SOURCES)
def test_compiles_with_clang(source, torch_pch, tmp_path):
    out = tmp_path / (source + ".o")
    run([*clang_flags(), "-include-pch", str(torch_pch), "-c", os.path.join(CSRC, source), "-o", str(out)],
        f"csrc/{source}")
    assert out.stat().st_size > 0
