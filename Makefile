# Two commands do everything on a fresh clone: `make demo` and `make test`.
# Each sets up .venv (torch, dependencies) and builds the C++ extension first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_SPEC ?= torch==2.13.0

.PHONY: all setup build clang test test-fast wheel-check torch-check demo bench compare clean

all: test

# The demo needs only the runtime dependencies; the tests add requirements-test.txt (triton, faiss, ...).
$(VENV)/.deps: requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, on its own: a CPU wheel is on disk here; never let another package pull a CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -r requirements.txt
	$(PIP) install -q --no-deps -r requirements-nodeps.txt
	touch $@

$(VENV)/.deps-test: $(VENV)/.deps requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	touch $@

setup: $(VENV)/.deps $(VENV)/.deps-test

$(VENV)/.built: $(VENV)/.deps setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# tests/test_build_clang.py compiles csrc/ with clang++ (GCC builds the extension). Where clang++ is
# missing and this runs as root with apt-get (CI), Debian's clang is installed (about a minute,
# once); elsewhere that test skips and says why.
clang:
	@command -v clang++ >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends clang >/dev/null; } || \
	  echo "clang++ is not installed: tests/test_build_clang.py will skip"

test: build clang $(VENV)/.deps-test
	$(PY) -m pytest -q -ra tests

# A user's install, end to end (CI runs it; `make test` skips it): `pip wheel . --no-build-isolation`
# from a copy of the sources, installed into a fresh venv that sees this torch (no downloads), then a
# smoke test there on every kernel variant this CPU runs. It compiles everything again (about 2.5 min here).
wheel-check: $(VENV)/.deps-test
	$(PY) -m pytest -q -ra tests/test_wheel.py --wheel

# The extension built against another torch than .venv's, in a fresh venv (tests/test_wheel.py):
# by default the newest pip may install here (a CUDA build from this disk, about 5 GB in the venv;
# its headers need C++20). CI does not run it.
TORCH_CHECK_SPEC ?= torch==2.14.1
torch-check: $(VENV)/.deps-test
	$(PY) -m pytest -q -ra -s tests/test_wheel.py -k another_torch --torch-spec "$(TORCH_CHECK_SPEC)"

demo: build
	$(PY) -m fastvq demo --out demo_out

# The pytest-benchmark suites (benchmarks/bench_<op>.py): quick, no anchors.
bench: build $(VENV)/.deps-test
	$(PY) -m pytest -q benchmarks --benchmark-only

# Every README table in one run from one commit: each benchmarks/compare_<op>.py on the CPU (one
# process per case; about 37 minutes on 2 quiet cores, printed first with the load average), then
# report.py redraws the plots and rewrites the tables. A failing script does not stop the others;
# make fails at the end. On a GPU: benchmarks/gpu_check.sh.
COMPARE_SCRIPTS := $(sort $(wildcard benchmarks/compare_*.py))
compare: build $(VENV)/.deps-test
	$(PY) benchmarks/report.py --expected
	@status=0; for script in $(COMPARE_SCRIPTS); do $(PY) $$script || status=1; done; \
	$(PY) benchmarks/report.py || status=1; exit $$status

clean:
	rm -rf build *.egg-info fastvq/_C*.so $(VENV)
