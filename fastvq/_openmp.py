"""How long torch's OpenMP threads spin before they sleep, set before torch loads its OpenMP.

GNU OpenMP (libgomp, torch's intra-op threads on Linux) lets a thread that finished its share of a
region spin up to 300,000 iterations for the next one, about a millisecond. Beside other
processes that want the cores, that spinning takes time from the thread still working when the
scheduler puts both on one core: a VQGAN training step beside two busy-loop processes on 2 cores
took 1.6 s with the default and 0.94 s with a spin of 10,000 iterations (tens of microseconds),
and the same 0.38 s on a quiet machine. libgomp reads GOMP_SPINCOUNT once, when it loads, so this
works only if fastvq is imported before torch (the `fastvq` command is) and the variable is unset;
`export GOMP_SPINCOUNT=10000` does it for any program. FASTVQ_OPENMP_SPIN=0 leaves OpenMP's
default alone. No torch import here: fastvq/__init__.py runs this first.
"""
from __future__ import annotations

import os
import sys

SPIN = "10000"
OPT_OUT = "FASTVQ_OPENMP_SPIN"
state = {"set_by_fastvq": False}


def tune_spin() -> bool:
    """Set GOMP_SPINCOUNT = SPIN if torch is not loaded yet and neither it nor OMP_WAIT_POLICY is
    set (nor FASTVQ_OPENMP_SPIN=0); returns whether it did."""
    if ("torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ
            or os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "off", "no")):
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN
    state["set_by_fastvq"] = True
    return True


def spin_setting() -> dict:
    """What the OpenMP threads of this process spin: GOMP_SPINCOUNT / OMP_WAIT_POLICY as the
    environment has them, and whether fastvq set the spin count in this process (a child of a
    process that did inherits the value, not the flag). It took effect only if libgomp loaded
    after that (torch imported after fastvq, and no other library loaded libgomp before)."""
    return {"GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT"), "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "set_by_fastvq": state["set_by_fastvq"]}
