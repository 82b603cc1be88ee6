"""The GPT2D pipeline end to end on tiny models: train-gpt --cond layout|lowres, sample at sizes
other than the training crop from a condition file, panoramas from a uniform layout, CFG, the
wavefront against one code at a time, the JSON record, and the 1-D prior beside it."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from fastvq.cli import main
from fastvq.pipeline.checkpoint import load_checkpoint

TINY_VQGAN = {
    "preset": "demo",
    "model": {"ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
              "embed_dim": 4, "n_embed": 16},
    "loss": {"disc_start": 2, "disc_ndf": 8, "disc_num_layers": 1},
    "train": {"steps": 2, "batch_size": 2, "size": 16, "log_every": 1, "eval_every": 2, "ckpt_every": 2,
              "heldout": 4},
}
TINY_GPT2D = {
    "preset": "demo",
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "rows": 2, "left": 2, "right": 1},
    "train": {"size": 16, "steps": 3, "batch_size": 4, "codes": 8, "warmup": 1, "log_every": 1, "ckpt_every": 3},
}
TINY_GPT1D = {
    "preset": "demo1d",
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "window": 8},
    "train": {"steps": 2, "batch_size": 4, "codes": 8, "warmup": 1, "log_every": 1, "ckpt_every": 2},
}


def _yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny VQGAN, and on it a layout GPT2D, a low-res GPT2D and a 1-D GPT."""
    root = tmp_path_factory.mktemp("pipeline2d")
    assert main(["train-vqgan", "--config", _yaml(root / "vq.yaml", TINY_VQGAN), "--out", str(root / "vq"),
                 "--no-progress"]) == 0
    vqgan = str(root / "vq" / "vqgan.ckpt")
    for name, config, extra in (("layout", TINY_GPT2D, ["--cond", "layout"]), ("lowres", TINY_GPT2D, ["--cond", "lowres"]),
                                ("gpt1d", TINY_GPT1D, [])):
        assert main(["train-gpt", "--config", _yaml(root / f"{name}.yaml", config), "--vqgan", vqgan,
                     "--out", str(root / name), "--no-progress", *extra]) == 0
    return root


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_layout_checkpoint_lists_the_classes_and_their_colours(runs):
    state = load_checkpoint(runs / "layout" / "gpt.ckpt")
    layout = state["layout"]
    assert layout["prior"] == "gpt2d" and layout["cond"] == "layout"
    assert layout["cond_classes"] == ["brick", "grass", "gravel"] and len(layout["cond_colours"]) == 3
    assert layout["cond_channels"] == 3 and layout["classes"] == 0  # the layout replaces the class prefix
    assert any(k.startswith("cond_encoder.") for k in state["model"])
    header = (runs / "layout" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"heldout_loss", "heldout_loss_uncond"} <= set(header)


def test_sample_from_a_layout_png_at_its_size(runs, tmp_path, capsys):
    from fastvq.pipeline.conditions import save_layout_png

    state = load_checkpoint(runs / "layout" / "gpt.ckpt")
    labels = torch.zeros(24, 40, dtype=torch.int64)
    labels[:, 20:] = 1
    save_layout_png(labels, tmp_path / "layout.png", [tuple(c) for c in state["layout"]["cond_colours"]])
    png = tmp_path / "out.png"
    assert main(["sample", "--ckpt", str(runs / "layout" / "gpt.ckpt"), "--cond", str(tmp_path / "layout.png"),
                 "-n", "1", "--out", str(png), "--no-progress", "--cfg-scale", "2"]) == 0
    assert _pixels(png).shape[:2] == (24 + 4, 40 + 4)  # one image, framed by 2 pixels
    record = json.loads(png.with_suffix(".json").read_text())
    assert record["height"] == 24 and record["width"] == 40 and record["cfg_scale"] == 2
    assert "layout" in record["condition"] and record["timings"]["sample_s"] > 0
    assert "240 codes each" in capsys.readouterr().out  # 12 x 20 codes at f = 2


def test_panorama_per_class_wider_and_taller_than_the_crops(runs, tmp_path):
    png = tmp_path / "pano.png"
    assert main(["sample", "--ckpt", str(runs / "layout" / "gpt.ckpt"), "--class", "brick", "gravel", "-n", "2",
                 "--height", "32", "--width", "48", "--out", str(png), "--no-progress"]) == 0
    assert _pixels(png).shape[:2] == (32 + 4, 2 * 48 + 6)
    assert "brick" in json.loads(png.with_suffix(".json").read_text())["condition"]


def test_wavefront_and_one_code_at_a_time_draw_the_same_image(runs, tmp_path):
    paths = {}
    for mode in ("wavefront", "sequential"):
        paths[mode] = tmp_path / f"{mode}.png"
        extra = ["--sequential"] if mode == "sequential" else []
        assert main(["sample", "--ckpt", str(runs / "layout" / "gpt.ckpt"), "--class", "grass", "-n", "2",
                     "--height", "20", "--width", "26", "--seed", "7", "--out", str(paths[mode]), "--no-progress",
                     *extra]) == 0
    assert np.array_equal(_pixels(paths["wavefront"]), _pixels(paths["sequential"]))


def test_lowres_condition_sets_the_output_size(runs, tmp_path):
    small = (np.random.default_rng(0).random((3, 5, 3)) * 255).astype(np.uint8)
    Image.fromarray(small).save(tmp_path / "small.png")
    png = tmp_path / "sr.png"
    assert main(["sample", "--ckpt", str(runs / "lowres" / "gpt.ckpt"), "--cond", str(tmp_path / "small.png"),
                 "-n", "1", "--out", str(png), "--no-progress"]) == 0
    assert _pixels(png).shape[:2] == (3 * 8 + 4, 5 * 8 + 4)  # lowres_factor 8


@pytest.mark.parametrize("argv, message", [
    (["--cond", "ABSENT"], "ABSENT"),
    (["--class", "marble"], "unknown class 'marble'"),
    (["--width", "15"], "multiple of 2"),
])
def test_bad_sample_arguments_are_one_line_errors(runs, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["sample", "--ckpt", str(runs / "layout" / "gpt.ckpt"), "--out", str(tmp_path / "x.png"), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_layout_training_needs_the_embedded_textures(runs, tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "a.png")
    with pytest.raises(SystemExit) as e:
        main(["train-gpt", "--config", _yaml(tmp_path / "g.yaml", TINY_GPT2D), "--vqgan",
              str(runs / "vq" / "vqgan.ckpt"), "--data", str(folder), "--cond", "layout", "--out", str(tmp_path / "g")])
    assert e.value.code == 2 and "mosaics of the embedded textures" in capsys.readouterr().err


def test_one_dimensional_prior_still_samples_taller_but_not_wider(runs, tmp_path, capsys):
    png = tmp_path / "tall.png"
    assert main(["sample", "--ckpt", str(runs / "gpt1d" / "gpt.ckpt"), "-n", "2", "--height", "32",
                 "--out", str(png), "--no-progress"]) == 0
    assert _pixels(png).shape[:2] == (32 + 4, 2 * 16 + 6)
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(runs / "gpt1d" / "gpt.ckpt"), "--width", "32", "--out", str(tmp_path / "w.png")])
    assert "training width" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sample", "--ckpt", str(runs / "gpt1d" / "gpt.ckpt"), "--cond", "x.png", "--out", str(tmp_path / "c.png")])
    assert "GPT2D" in capsys.readouterr().err
