"""fastvq.pipeline.checkpoint: round trips, kills during a save, corrupt files, resume and RNG state."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastvq.pipeline.checkpoint import (LAST_CHECKPOINT, capture_rng_state, load_checkpoint, restore_rng_state,
                                        resume_path, save_checkpoint)

REPO = Path(__file__).resolve().parents[1]


def training_state(step=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    model(torch.randn(2, 4)).square().mean().backward()
    optimizer.step()
    return {"step": step, "config": {"ch_mult": [1, 2], "beta": 0.25, "name": "vqgan", "dtype": torch.bfloat16},
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": capture_rng_state()}


def assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_round_trip_loads_weights_only(tmp_path):
    state = training_state()
    path = save_checkpoint(tmp_path / "run" / "last.ckpt", state)  # creates the directory
    assert path == tmp_path / "run" / "last.ckpt"
    loaded = load_checkpoint(path)
    assert_same(loaded, state)
    assert_same(torch.load(path, weights_only=True), state)
    assert list(path.parent.iterdir()) == [path]  # no temporary left behind


def test_unloadable_state_is_refused_before_writing(tmp_path):
    path = tmp_path / "last.ckpt"
    with pytest.raises(TypeError, match=r"state\['config'\]\['mean'\] is a numpy.ndarray"):
        save_checkpoint(path, {"step": 1, "config": {"mean": np.zeros(3)}})
    with pytest.raises(TypeError, match=r"state\['lr'\] is a numpy.float64"):
        save_checkpoint(path, {"lr": np.float64(1e-3)})
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(path, [1, 2])
    assert not any(tmp_path.iterdir())


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_checkpoint(tmp_path / "nothing.ckpt")
    good = save_checkpoint(tmp_path / "good.ckpt", training_state()).read_bytes()
    cases = {"truncated.ckpt": good[:len(good) // 2], "noise.ckpt": os.urandom(4096), "empty.ckpt": b""}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=name):
            load_checkpoint(tmp_path / name)
    torch.save({"state": Path("x")}, tmp_path / "unsafe.ckpt")  # a pickled object, not weights-only
    with pytest.raises(ValueError, match="unsafe.ckpt"):
        load_checkpoint(tmp_path / "unsafe.ckpt")
    torch.save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="list.ckpt holds a list"):
        load_checkpoint(tmp_path / "list.ckpt")


def test_next_save_removes_leftover_temporaries(tmp_path):
    path = tmp_path / "last.ckpt"
    leftover = tmp_path / ".last.ckpt.123-abcd.tmp"
    leftover.write_bytes(b"partial")
    other = tmp_path / ".best.ckpt.1-ab.tmp"  # another checkpoint's temporary: not ours to delete
    other.write_bytes(b"partial")
    save_checkpoint(path, {"step": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best.ckpt.1-ab.tmp", "last.ckpt"]


# A child that saves 32 MB checkpoints in a loop, printing each completed step; with "half" it
# then starts one more save whose write stops halfway, prints "half" and waits to be killed.
SAVER = r"""
import io, sys, time, torch
from fastvq.pipeline.checkpoint import save_checkpoint
path, steps, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
weights = torch.empty(8_000_000)
for step in range(1, steps + 1):
    save_checkpoint(path, {"step": step, "weights": weights.fill_(step)})
    print(step, flush=True)
if mode == "half":
    real_save = torch.save
    def half_save(obj, f):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        print("half", flush=True)
        time.sleep(60)
    torch.save = half_save
    save_checkpoint(path, {"step": steps + 1, "weights": weights.fill_(steps + 1)})
"""


def run_and_kill(path, steps, mode, delay, after="1"):
    """Start the saver, SIGKILL it `delay` seconds after it printed `after`; returns all it printed."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    child = subprocess.Popen([sys.executable, "-c", SAVER, str(path), str(steps), mode], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        lines = []
        while after not in lines and child.poll() is None:
            lines.append(child.stdout.readline().strip())
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        lines += child.stdout.read().split()
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL, "the saver finished before it was killed"
    return lines


def assert_complete(path, low, high):
    state = load_checkpoint(path)
    assert low <= state["step"] <= high
    assert torch.equal(state["weights"], torch.full((8_000_000,), float(state["step"])))


def test_kill_during_save_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "last.ckpt"
    for delay in (0.0, 0.05, 0.25):
        save_checkpoint(path, {"step": 0, "weights": torch.zeros(8_000_000)})
        printed = [int(line) for line in run_and_kill(path, 10_000, "loop", delay)]
        # the file holds the last step the child reported or the one it was saving when killed
        assert_complete(path, printed[-1], printed[-1] + 1)


def test_kill_halfway_through_writing(tmp_path):
    path = tmp_path / "last.ckpt"
    assert run_and_kill(path, 2, "half", 0.1, after="half") == ["1", "2", "half"]
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size < path.stat().st_size
    assert_complete(path, 2, 2)
    save_checkpoint(path, {"step": 3, "weights": torch.full((8_000_000,), 3.0)})
    assert list(tmp_path.iterdir()) == [path]
    assert_complete(path, 3, 3)


def test_resume_path(tmp_path):
    assert resume_path(tmp_path, None) is None and resume_path(tmp_path, False) is None
    assert resume_path(tmp_path, True) is None and resume_path(tmp_path, "auto") is None  # nothing yet: fresh run
    last = save_checkpoint(tmp_path / LAST_CHECKPOINT, {"step": 1})
    assert resume_path(tmp_path, True) == last and resume_path(tmp_path, "auto") == last
    other = save_checkpoint(tmp_path / "other" / "step100.ckpt", {"step": 100})
    assert resume_path(tmp_path, str(other)) == other
    save_checkpoint(tmp_path / "other" / LAST_CHECKPOINT, {"step": 100})
    assert resume_path(tmp_path / "x", tmp_path / "other") == tmp_path / "other" / LAST_CHECKPOINT
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        resume_path(tmp_path, tmp_path / "missing.ckpt")
    with pytest.raises(ValueError, match="resume must be"):
        resume_path(tmp_path, 3)


def draws():
    return (torch.rand(3), torch.randn(2, dtype=torch.float64), np.random.rand(3), np.random.randn(), random.random(),
            random.gauss(0, 1))


def test_rng_state_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    save_checkpoint(tmp_path / "rng.ckpt", {"rng": capture_rng_state()})
    expected = draws()
    draws()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.ckpt")["rng"])
    for a, b in zip(draws(), expected):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else np.array_equal(a, b)
