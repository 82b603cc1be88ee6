"""A user's install: `pip wheel . --no-build-isolation --no-deps` makes a wheel that installs into a
fresh virtual environment holding the same torch and works there (import, available_backends, one op
of each kind against its reference, on every kernel variant this CPU runs). Nothing is downloaded:
the new environment sees this torch through a .pth file, and pip runs with --no-index.

The wheel compiles the extension from scratch (every kernel file once per variant: about 2.5 min on
2 cores here), so this runs only when asked: `make wheel-check` (CI calls it) or
`pytest tests/test_wheel.py --wheel`; `make test` reports it as skipped.

With `--torch-spec SPEC` (`make torch-check`, by default the newest torch pip may install here) a
second test installs that torch into a fresh environment with pip, builds fastvq there from the
sources as a user would (`pip install --no-build-isolation`), and runs the same smoke test: the
check that the extension builds against a torch other than the one it is developed with (torch
2.14's headers need C++20).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a wheel is built from never needs these (and they can be large)
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__",
                                     ".pytest_cache", ".benchmarks", "demo_out", "benchmarks", "tests")

SMOKE = r"""
import os, sys, torch, fastvq
from fastvq import _backend
from fastvq.ops.quantize import nearest_code_reference
from fastvq.ops.window_attention import sliding_window_attention_reference

assert fastvq.__file__.startswith(sys.prefix), f"fastvq imported from {fastvq.__file__}, not the new environment"
cpp = fastvq.available_backends()["cpp"]
assert cpp.available, cpp.reason
print("cpp:", cpp.reason)
g = torch.Generator().manual_seed(0)
x, cb = torch.randn(300, 40, generator=g), torch.randn(257, 40, generator=g)
q, k, v = (torch.randn(1, 2, 150, 32, generator=g) for _ in range(3))
for isa in _backend.cpu_isas():
    _backend.set_cpu_isa(isa)
    idx, dist = fastvq.nearest_code(x, cb, backend="cpp")
    ref_idx, ref_dist = nearest_code_reference(x, cb)
    assert torch.equal(idx, ref_idx), isa
    torch.testing.assert_close(dist, ref_dist, rtol=1e-5, atol=1e-5)
    out = fastvq.sliding_window_attention(q, k, v, window=40, backend="cpp")
    ref, _ = sliding_window_attention_reference(q, k, v, 40, 32 ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    print("ok:", isa)
"""


def run(cmd, what, both=False, **kwargs):
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{what} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result.stdout + result.stderr if both else result.stdout


def pip_env(**extra):
    """pip's environment: the default build (the one a user gets), no version check."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    env.pop("FASTVQ_NATIVE", None)
    return env


def smoke_env():
    # nothing of this checkout's settings: the new environment must stand on its own
    return {key: value for key, value in os.environ.items() if not key.startswith(("FASTVQ_", "PYTHON"))}


@pytest.fixture
def wheel_requested(request):
    if not request.config.getoption("--wheel"):
        pytest.skip("builds the extension from scratch (minutes): run with --wheel (`make wheel-check`)")


def test_wheel_installs_into_a_fresh_venv_and_runs(wheel_requested, tmp_path):
    import torch

    source, wheels, env = tmp_path / "src", tmp_path / "wheels", tmp_path / "venv"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    no_index = pip_env(PIP_NO_INDEX="1")
    run([sys.executable, "-m", "pip", "wheel", str(source), "--no-build-isolation", "--no-deps", "-w", str(wheels)],
        "pip wheel", env=no_index)
    (wheel,) = wheels.glob("fastvq-*.whl")

    run([sys.executable, "-m", "venv", str(env)], "python -m venv")
    python = env / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "venv paths").strip()
    # the same torch (and numpy): this environment's site-packages, after the new one's own
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    with open(os.path.join(site, "same_torch.pth"), "w") as f:
        f.write(torch_site + "\n")
    run([str(python), "-m", "pip", "install", "--no-deps", str(wheel)], "pip install of the wheel", env=no_index)

    out = run([str(python), "-c", SMOKE], "the smoke test in the new environment", cwd=tmp_path, env=smoke_env())
    assert "ok: baseline" in out, out


@pytest.fixture
def torch_spec(request):
    spec = request.config.getoption("--torch-spec")
    if not spec:
        pytest.skip("installs another torch and builds against it (minutes, GBs): run with --torch-spec SPEC "
                    "(`make torch-check`)")
    return spec


def test_builds_against_another_torch(torch_spec, tmp_path):
    source, env = tmp_path / "src", tmp_path / "venv"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    run([sys.executable, "-m", "venv", str(env)], "python -m venv")
    python = str(env / "bin" / "python")
    # what the build itself needs with --no-build-isolation: setuptools, ninja (and numpy for torch)
    run([python, "-m", "pip", "install", "-q", torch_spec, "numpy", "setuptools", "ninja"],
        f"pip install {torch_spec}", env=pip_env())
    version = run([python, "-c", "import torch; print(torch.__version__)"], "import torch").strip()
    build = run([python, "-m", "pip", "install", "-v", "--no-build-isolation", "--no-deps", str(source)],
                f"building fastvq against torch {version}", both=True, env=pip_env())
    standard = re.search(r"fastvq: building fastvq\._C for torch \S+ with (-std=\S+)", build)
    assert standard, f"setup.py did not say which C++ standard it built with:\n{build[-3000:]}"
    standard = standard.group(1)
    out = run([python, "-c", SMOKE], f"the smoke test on torch {version}", cwd=tmp_path, env=smoke_env())
    print(f"torch {version}: built with {standard}; {out.strip().splitlines()[-1]}")
    assert "ok: baseline" in out, out
