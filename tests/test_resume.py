"""Exact resume: a training run killed with SIGKILL after a checkpoint and resumed from it ends bit for bit
where the uninterrupted run ends (on a CPU), for train-vqgan and train-gpt.

Each case runs three `fastvq` processes with the same tiny configuration: the uninterrupted run to
STEPS; a run that writes its checkpoint at KEPT, trains on past it (logging rows the resume must
drop) and is SIGKILLed while it waits at the next checkpoint, before writing it; and the same command
with --resume, which continues from KEPT to STEPS. The data is a folder of two small images whose
training epoch is three batches, so the checkpoint falls in the middle of the second epoch; the
discriminator starts after the checkpoint; the GPT has dropout and pkeep < 1."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastvq.pipeline.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS, KEPT, KILLED_AT = 8, 4, 6  # checkpoints every 2 steps; the kill comes while saving step 6

TINY_VQGAN = {
    "preset": "demo",
    "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
              "embed_dim": 4, "n_embed": 16},
    "loss": {"disc_start": 5, "disc_ndf": 8, "disc_num_layers": 1},
    "train": {"steps": STEPS, "batch_size": 2, "size": 16, "log_every": 1, "eval_every": 3, "ckpt_every": 2,
              "heldout": 4},
}
TINY_GPT = {  # the demo preset's dropout (0.1) and pkeep (0.9) stay
    "preset": "demo",
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "rows": 2, "left": 2, "right": 1},  # GPT2D
    "train": {"size": 16, "steps": STEPS, "batch_size": 4, "codes": 16, "warmup": 2, "log_every": 1, "ckpt_every": 2},
}
TIMING_COLUMNS = {"images_per_s", "tokens_per_s"}  # wall-clock rates: the only values that may differ

# `fastvq ARGS...` in which the trainer's save of step BLOCK_AT (if any) prints "blocked" and waits
# to be killed, before writing anything; the loss-curve plot (seconds of matplotlib) is skipped.
CHILD = r"""
import sys, time
import fastvq.pipeline.train_gpt, fastvq.pipeline.train_vqgan
from fastvq.cli import main
block_at = int(sys.argv[1])
for trainer in (fastvq.pipeline.train_gpt, fastvq.pipeline.train_vqgan):
    def save(path, state, real=trainer.save_checkpoint):
        if state.get("step") == block_at:
            print("blocked", flush=True)
            time.sleep(600)
        return real(path, state)
    trainer.save_checkpoint = save
    trainer.plot_curves = lambda *args, **kwargs: None
sys.exit(main(sys.argv[2:]))
"""


def start(argv, block_at=0):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("FASTVQ_BACKEND", None)
    return subprocess.Popen([sys.executable, "-c", CHILD, str(block_at), *argv, "--device", "cpu", "--no-progress"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(child, timeout=120):
    out, err = child.communicate(timeout=timeout)
    assert child.returncode == 0, err[-3000:]
    return out


def kill_when_blocked(child, timeout=120):
    deadline = time.monotonic() + timeout
    try:
        line = ""
        while line != "blocked" and child.poll() is None and time.monotonic() < deadline:
            line = child.stdout.readline().strip()
        assert line == "blocked", child.stderr.read()[-3000:]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL


def interrupted_and_uninterrupted(tmp_path, argv):
    """Run `argv --out DIR` uninterrupted (DIR full) and killed-then-resumed (DIR resumed), the first two at once."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    uninterrupted = start(argv + ["--out", str(full)])
    killed = start(argv + ["--out", str(resumed)], block_at=KILLED_AT)
    try:
        kill_when_blocked(killed)
        assert load_checkpoint(resumed / "last.ckpt")["step"] == KEPT
        rows = metrics_rows(resumed)
        assert max(int(row["step"]) for row in rows) == KILLED_AT  # logged past the checkpoint, to be dropped
        finish(uninterrupted)
    finally:
        for child in (uninterrupted, killed):
            if child.poll() is None:
                child.kill()
                child.wait()
    out = finish(start(argv + ["--out", str(resumed), "--resume"]))
    assert f"at step {KEPT}" in out and "warning" not in out, out
    return full, resumed


def metrics_rows(out_dir):
    with open(out_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def assert_same_state(a, b, where="state"):
    """Equal nested checkpoint contents; tensors bit for bit (torch.equal, same dtype)."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(full, resumed, parts, model_file):
    a, b = load_checkpoint(full / "last.ckpt"), load_checkpoint(resumed / "last.ckpt")
    assert a["step"] == b["step"] == STEPS
    for name in parts + ["rng"]:
        assert_same_state(a[name], b[name], name)
    assert_same_state(load_checkpoint(full / model_file)["model"], load_checkpoint(resumed / model_file)["model"])
    rows_a, rows_b = metrics_rows(full), metrics_rows(resumed)
    assert [r for r in rows_a if int(r["step"]) > KEPT]  # rows after the resume point exist and match
    assert rows_a == rows_b


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two random 48 x 44 images, classes a and b: 3 training crops of 16 each, an epoch of 3 batches of 2."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir()
        Image.fromarray(rng.integers(0, 256, (48, 44, 3), dtype=np.uint8)).save(root / name / "image.png")
    return root


def _yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def vqgan_runs(tmp_path_factory, images):
    root = tmp_path_factory.mktemp("vqgan")
    argv = ["train-vqgan", "--config", _yaml(root / "vq.yaml", TINY_VQGAN), "--data", str(images)]
    return interrupted_and_uninterrupted(root, argv)


def test_train_vqgan_resumed_after_sigkill_equals_the_uninterrupted_run(vqgan_runs):
    full, resumed = vqgan_runs
    assert_same_run(full, resumed, ["model", "loss", "opt_ae", "opt_d", "data"], "vqgan.ckpt")
    assert load_checkpoint(full / "last.ckpt")["data"] == {"epoch": 2, "sample": 4, "world_size": 1}
    header = (full / "metrics.csv").read_text().splitlines()[0]
    assert "disc_loss" in header  # the discriminator started after the checkpoint


TINY_GPT_1D = {"preset": "demo1d", "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "window": 8},
               "train": {k: v for k, v in TINY_GPT["train"].items() if k != "size"}}


@pytest.mark.parametrize("config", [TINY_GPT, TINY_GPT_1D], ids=["gpt2d", "gpt"])
def test_train_gpt_resumed_after_sigkill_equals_the_uninterrupted_run(vqgan_runs, images, tmp_path, config):
    vqgan = vqgan_runs[0] / "vqgan.ckpt"
    argv = ["train-gpt", "--config", _yaml(tmp_path / "gpt.yaml", config), "--vqgan", str(vqgan),
            "--data", str(images)]
    full, resumed = interrupted_and_uninterrupted(tmp_path, argv)
    assert_same_run(full, resumed, ["model", "opt"], "gpt.ckpt")
    assert "batches" in load_checkpoint(full / "last.ckpt")["rng"]["generators"]


def test_old_checkpoint_without_data_position_resumes_with_a_warning(images, tmp_path, monkeypatch):
    from fastvq.pipeline import train_vqgan as trainer
    from fastvq.pipeline.checkpoint import save_checkpoint
    from fastvq.pipeline.config import load_config
    from fastvq.pipeline.train_vqgan import train_vqgan

    monkeypatch.setattr(trainer, "plot_curves", lambda *args, **kwargs: None)

    config = load_config("vqgan", _yaml(tmp_path / "vq.yaml", TINY_VQGAN), {"train.steps": 1})
    train_vqgan(config, tmp_path, data=str(images), device="cpu", show_progress=False, log=lambda *a: None)
    state = load_checkpoint(tmp_path / "last.ckpt")
    del state["data"]  # as written before the data position was saved
    save_checkpoint(tmp_path / "last.ckpt", state)
    lines = []
    config["train"]["steps"] = 2
    train_vqgan(config, tmp_path, data=str(images), resume=True, device="cpu", show_progress=False, log=lines.append)
    assert any(line.startswith("warning: --resume:") and "data position" in line for line in lines), lines
    after = load_checkpoint(tmp_path / "last.ckpt")
    assert after["step"] == 2 and after["data"] == {"epoch": 0, "sample": 4, "world_size": 1}


def test_train_batches_continue_from_any_position(images):
    from fastvq.pipeline.data import TrainBatches, make_dataset

    dataset = make_dataset(str(images), 16, "train")  # 6 items
    whole = TrainBatches(dataset, 2, seed=3)
    expected = [next(whole)[0] for _ in range(8)]
    for stop in (0, 2, 3, 5):
        first = TrainBatches(dataset, 2, seed=3)
        for _ in range(stop):
            next(first)
        state = first.state_dict()
        assert state == first.position_at(stop)
        again = TrainBatches(make_dataset(str(images), 16, "train"), 2, seed=3)
        again.load_state_dict(state)
        assert all(torch.equal(next(again)[0], x) for x in expected[stop:])
    # epochs differ in order and crops; ranks split an epoch without overlap
    assert not torch.equal(expected[0], expected[3])
    ranks = [TrainBatches(dataset, 1, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert not set(ranks[0]._indices(0)) & set(ranks[1]._indices(0))
    assert len(ranks[0]._indices(0)) == 3
    with pytest.raises(ValueError, match="fewer than one batch"):
        TrainBatches(dataset, 4, world_size=2)


def test_restore_training_rng_picks_this_ranks_state_and_warns_when_it_cannot():
    from fastvq.pipeline.checkpoint import capture_rng_state, restore_training_rng

    gen = torch.Generator()
    states = []
    for rank in range(2):
        torch.manual_seed(rank)
        gen.manual_seed(10 + rank)
        states.append(capture_rng_state({"batches": gen}))
    state = {"rng": states[0], "rng_ranks": states}
    assert restore_training_rng(state, {"batches": gen}, rank=1, world_size=2) == []
    torch.manual_seed(1)
    expected = torch.rand(2), torch.rand(2, generator=torch.Generator().manual_seed(11))
    restore_training_rng(state, {"batches": gen}, rank=1, world_size=2)
    assert torch.equal(torch.rand(2), expected[0]) and torch.equal(torch.rand(2, generator=gen), expected[1])
    warnings = restore_training_rng(state, {"batches": gen, "other": torch.Generator()}, rank=0, world_size=3)
    assert len(warnings) == 2 and "2 process(es)" in warnings[0] and "other" in warnings[1]
