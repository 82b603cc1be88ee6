"""A source distribution builds the extension: `python setup.py sdist` (no compiling) puts in the
tarball every file setup.py compiles or those files #include, the Triton kernels and the package
data. setuptools adds only the compiled .cpp files by itself; the headers come from MANIFEST.in."""
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# an sdist is made from the sources: leave out build products, the environment and large folders
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "*.so", "*.o", "__pycache__",
                                     ".pytest_cache", ".benchmarks", "demo_out", "benchmarks", "tests")
INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def compiled_and_included(root: str) -> set[str]:
    """csrc's .cpp / .cu files (setup.py compiles them all) and every file they #include "...",
    followed transitively, as paths relative to root."""
    todo = sorted(glob.glob(os.path.join(root, "csrc", "*.cpp")) + glob.glob(os.path.join(root, "csrc", "*.cu")))
    seen = set()
    while todo:
        path = os.path.normpath(todo.pop())
        if path in seen or not os.path.isfile(path):  # a <torch/...> style include in quotes is not ours
            continue
        seen.add(path)
        with open(path) as f:
            todo += [os.path.join(os.path.dirname(path), name) for name in INCLUDE.findall(f.read())]
    return {os.path.relpath(path, root) for path in seen}


def test_sdist_holds_every_file_the_extension_build_reads(tmp_path):
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)  # setup.py writes build/ and egg-info where it runs
    result = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(dist)], cwd=src,
                            capture_output=True, text=True, env={**os.environ, "FASTVQ_CUDA": "0"})
    assert result.returncode == 0, f"setup.py sdist failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert not list(src.rglob("*.o")) and not list(src.rglob("*.so"))  # nothing was compiled
    (tarball,) = dist.glob("fastvq-*.tar.gz")
    with tarfile.open(tarball) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}

    needed = compiled_and_included(str(src))
    assert any(path.endswith(".h") for path in needed)  # the include scan found the headers
    needed |= {os.path.relpath(p, src) for p in glob.glob(str(src / "kernels" / "*.py"))}
    needed |= {os.path.relpath(p, src) for p in glob.glob(str(src / "fastvq" / "assets" / "*.png"))}
    needed |= {"setup.py", "pyproject.toml", "README.md"}
    missing = sorted(needed - names)
    assert not missing, f"the sdist lacks {missing} (add them to MANIFEST.in)"
