"""The reference pipeline end to end on tiny models: train-vqgan, train-gpt, sample, resume,
torchrun with two gloo processes, and one-line errors for bad configs and paths."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastvq.cli import main
from fastvq.pipeline.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent

TINY_VQGAN = {
    "preset": "demo",
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
              "embed_dim": 4, "n_embed": 16},
    "loss": {"disc_start": 2, "disc_ndf": 8, "disc_num_layers": 1},
    "train": {"steps": 4, "batch_size": 2, "size": 16, "log_every": 1, "eval_every": 2, "ckpt_every": 2,
              "heldout": 4},
}
TINY_GPT = {
    "preset": "demo",
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "rows": 2, "left": 2, "right": 1},  # GPT2D
    "train": {"size": 16, "steps": 4, "batch_size": 4, "codes": 16, "warmup": 1, "log_every": 1, "ckpt_every": 2},
}


def _yaml(tmp_path: Path, name: str, config: dict) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VQGAN and a tiny prior on it, trained once for the tests below."""
    root = tmp_path_factory.mktemp("pipeline")
    vq_cfg, gpt_cfg = _yaml(root, "vq.yaml", TINY_VQGAN), _yaml(root, "gpt.yaml", TINY_GPT)
    assert main(["train-vqgan", "--config", vq_cfg, "--out", str(root / "vq"), "--no-progress"]) == 0
    assert main(["train-gpt", "--config", gpt_cfg, "--vqgan", str(root / "vq" / "vqgan.ckpt"),
                 "--out", str(root / "gpt"), "--no-progress"]) == 0
    return root


def test_train_vqgan_writes_metrics_pictures_and_checkpoints(trained):
    out = trained / "vq"
    for name in ("metrics.csv", "loss_curves.png", "reconstructions_000004.png", "last.ckpt", "vqgan.ckpt"):
        assert (out / name).is_file(), name
    state = load_checkpoint(out / "last.ckpt")
    assert state["step"] == 4 and state["kind"] == "vqgan-train"
    header = (out / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"heldout_psnr", "codebook_usage"} <= set(header)
    # the discriminator started at step 2: its loss is logged from then on
    assert any("disc" in column for column in header), header


def test_train_gpt_checkpoint_carries_the_vqgan(trained):
    state = load_checkpoint(trained / "gpt" / "gpt.ckpt")
    assert state["kind"] == "gpt" and state["layout"]["h"] == 8 and state["layout"]["w"] == 8
    assert state["vqgan"]["model"]["quantize.embedding.weight"].shape == (16, 4)


def test_sample_taller_than_training_crops_through_the_ring(trained, tmp_path, capsys):
    png = tmp_path / "tall.png"
    assert main(["sample", "--ckpt", str(trained / "gpt" / "gpt.ckpt"), "--out", str(png), "-n", "2",
                 "--height", "64", "--top-k", "5"]) == 0
    width, height = Image.open(png).size
    # two images side by side of 16 x 64 pixels (+ padding): 4x the tokens of a 16 x 16 crop
    assert height >= 64 and 2 * 16 <= width < 2 * 64
    assert "256 codes each" in capsys.readouterr().out


def test_sample_zoom_enlarges_every_pixel(trained, tmp_path):
    paths = {zoom: tmp_path / f"zoom{zoom}.png" for zoom in (1, 3)}
    for zoom, png in paths.items():
        assert main(["sample", "--ckpt", str(trained / "gpt" / "gpt.ckpt"), "--out", str(png), "-n", "2",
                     "--zoom", str(zoom)]) == 0
    small, big = (torch.from_numpy(np.asarray(Image.open(paths[z]))) for z in (1, 3))
    assert small.shape[:2] == (16 + 4, 2 * 16 + 6) and big.shape[:2] == (3 * 16 + 4, 2 * 3 * 16 + 6)
    # the zoomed first image is the plain one with every pixel repeated 3 x 3 (nearest neighbour)
    first = small[2:18, 2:18]
    assert torch.equal(big[2:50, 2:50], first.repeat_interleave(3, 0).repeat_interleave(3, 1))


def test_sample_cond_on_a_prior_without_a_spatial_condition_is_refused(trained, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(trained / "gpt" / "gpt.ckpt"), "--out", str(tmp_path / "s.png"),
              "--cond", str(tmp_path / "layout.png")])
    assert e.value.code == 2 and "without a spatial condition" in capsys.readouterr().err


def test_resume_continues_where_the_last_checkpoint_stopped(trained, tmp_path):
    cfg = _yaml(tmp_path, "vq.yaml", {**TINY_VQGAN, "train": {**TINY_VQGAN["train"], "steps": 2}})
    out = tmp_path / "run"
    assert main(["train-vqgan", "--config", cfg, "--out", str(out), "--no-progress"]) == 0
    before = load_checkpoint(out / "last.ckpt")
    assert main(["train-vqgan", "--config", cfg, "--out", str(out), "--steps", "4", "--resume",
                 "--no-progress"]) == 0
    after = load_checkpoint(out / "last.ckpt")
    assert before["step"] == 2 and after["step"] == 4
    assert not torch.equal(before["model"]["decoder.conv_out.weight"], after["model"]["decoder.conv_out.weight"])
    steps = [int(line.split(",")[0]) for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert sorted(set(steps)) == [1, 2, 3, 4]


@pytest.mark.parametrize("argv, message", [
    (["train-vqgan", "--config", "no-such-preset"], "neither a preset"),
    (["train-gpt", "--vqgan", "/nonexistent/vqgan.ckpt"], "/nonexistent/vqgan.ckpt"),
    (["sample", "--ckpt", "/nonexistent/gpt.ckpt"], "/nonexistent/gpt.ckpt"),
    (["train-vqgan", "--data", "/nonexistent/images"], "/nonexistent/images"),
])
def test_bad_paths_are_one_line_errors(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--out", str(tmp_path / "x")] if argv[0] != "sample" else argv + ["--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_unknown_config_key_names_the_key(tmp_path, capsys):
    cfg = _yaml(tmp_path, "bad.yaml", {"model": {"chanels": 32}})
    with pytest.raises(SystemExit) as e:
        main(["train-vqgan", "--config", cfg, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "chanels" in err and not (tmp_path / "x" / "last.ckpt").exists()


def test_sample_refuses_a_height_that_is_not_a_multiple_of_the_downsampling(trained, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(trained / "gpt" / "gpt.ckpt"), "--out", str(tmp_path / "s.png"),
              "--height", "31"])
    assert "multiple of 2" in capsys.readouterr().err


def test_torchrun_two_gloo_processes(trained, tmp_path):
    """train-vqgan and train-gpt under torchrun: DDP on gloo, files from rank 0 only."""
    cfg = _yaml(tmp_path, "vq.yaml", {**TINY_VQGAN, "train": {**TINY_VQGAN["train"], "steps": 2}})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastvq"]
    out = tmp_path / "ddp"
    done = subprocess.run(run + ["train-vqgan", "--config", cfg, "--out", str(out / "vq"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    state = load_checkpoint(out / "vq" / "last.ckpt")
    assert state["step"] == 2
    gpt_cfg = _yaml(tmp_path, "gpt.yaml", {**TINY_GPT, "train": {**TINY_GPT["train"], "steps": 2}})
    done = subprocess.run(run + ["train-gpt", "--config", gpt_cfg, "--vqgan", str(out / "vq" / "vqgan.ckpt"),
                                 "--out", str(out / "gpt"), "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert load_checkpoint(out / "gpt" / "gpt.ckpt")["step"] == 2
    lines = (out / "vq" / "metrics.csv").read_text().splitlines()
    assert len([line for line in lines[1:] if line.startswith("1,")]) == 1  # one writer


def test_demo_quick_writes_the_report(tmp_path):
    from fastvq.pipeline.demo import run_demo

    result = run_demo(tmp_path, quick=True, show_progress=False, log=lambda *a: None)
    report = result["report"].read_text()
    for name in ("panoramas.png", "layout_to_image.png", "lowres_to_highres.png", "vqgan/loss_curves.png",
                 "gpt_layout/loss_curves.png"):
        assert (tmp_path / name).is_file() and name in report
    assert "held-out PSNR" in report and "codebook usage" in report and "with the layout" in report
    assert "Layout fidelity" in report and "Held-out NLL per code" in report and result["quality"]["lpips"]["source"]
    assert result["pictures"]["speed"]["same_codes"]  # the wavefront drew what one code at a time draws
    assert {r["op"].split()[0] for r in result["kernels"]} == {"nearest_code", "sliding_window_attention",
                                                                "sample_logits"}
