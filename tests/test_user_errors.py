"""Mistakes a user makes, and what their machine refuses, reported as one line (exit status 2 from
the CLI, a ValueError / TypeError naming the argument from the API), before any work where that
can be known; and the pipeline saying what it does (train-gpt's data, progress without a terminal)."""
import errno
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import fastvq.pipeline.checkpoint as checkpoint_module
from fastvq import sample_logits
from fastvq.cli import main
from fastvq.models.gpt import GPT, sample_with_past
from fastvq.nn.quantize import VectorQuantizer
from fastvq.pipeline.checkpoint import check_output_file, load_checkpoint, save_checkpoint, write_atomically
from fastvq.pipeline.config import ConfigError, load_config
from fastvq.pipeline.logs import progress

TINY_VQGAN = {
    "preset": "demo",
    "model": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "z_channels": 8,
              "embed_dim": 4, "n_embed": 16},
    "loss": {"disc_start": 2, "disc_ndf": 8, "disc_num_layers": 1, "perceptual_weight": 0.0},
    "train": {"steps": 2, "batch_size": 2, "size": 16, "log_every": 1, "eval_every": 2, "ckpt_every": 2,
              "heldout": 4},
}
TINY_GPT = {
    "preset": "demo",
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "rows": 2, "left": 2, "right": 1},  # GPT2D
    "train": {"size": 16, "steps": 2, "batch_size": 4, "codes": 16, "warmup": 1, "log_every": 1, "ckpt_every": 2},
}


def _yaml(directory: Path, name: str, config: dict) -> str:
    path = directory / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def one_line_error(argv, capsys) -> str:
    """Run the CLI, expect exit status 2 and exactly one line on stderr; return that line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny VQGAN trained on a folder of the user's images (two classes), and a tiny prior on it
    trained without --data."""
    root = tmp_path_factory.mktemp("user_errors")
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        (root / "images" / name).mkdir(parents=True)
        pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / name / "a.png")
    vq_cfg, gpt_cfg = _yaml(root, "vq.yaml", TINY_VQGAN), _yaml(root, "gpt.yaml", TINY_GPT)
    assert main(["train-vqgan", "--config", vq_cfg, "--data", str(root / "images"), "--out", str(root / "vq"),
                 "--no-progress"]) == 0
    return root


@pytest.fixture(scope="module")
def prior(trained):
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["train-gpt", "--config", str(trained / "gpt.yaml"), "--vqgan", str(trained / "vq" / "vqgan.ckpt"),
                     "--out", str(trained / "gpt"), "--no-progress"]) == 0
    return trained / "gpt" / "gpt.ckpt", out.getvalue()


# ----------------------------------------------------------------------------- --out

@pytest.mark.parametrize("command", ["train-vqgan", "train-gpt", "demo", "kmeans"])
def test_out_under_a_file_is_one_line_before_any_work(command, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    line = one_line_error([command, "--out", str(blocker / "run")], capsys)
    assert f"{blocker} is not a directory" in line


def test_out_that_is_a_file_or_a_device(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    assert "exists and is not a directory" in one_line_error(["train-vqgan", "--out", str(afile)], capsys)
    # a directory check only: nothing is written, so the real /dev/null is safe here
    assert "/dev/null exists and is not a directory" in one_line_error(["train-vqgan", "--out", "/dev/null"], capsys)


def test_sample_out_that_is_a_directory_a_device_or_under_a_file(prior, tmp_path, capsys):
    ckpt, _ = prior
    fifo = tmp_path / "pipe"  # stands in for /dev/null: not a regular file (and harmless if written)
    os.mkfifo(fifo)
    assert "not a regular file" in one_line_error(["sample", "--ckpt", str(ckpt), "--out", str(fifo)], capsys)
    assert "is a directory" in one_line_error(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path)], capsys)
    afile = tmp_path / "a_file"
    afile.write_text("x")
    line = one_line_error(["sample", "--ckpt", str(ckpt), "--out", str(afile / "x.png")], capsys)
    assert "cannot write" in line and f"{afile} is not a directory" in line
    assert afile.read_text() == "x"


def test_dev_null_is_never_a_target_of_an_atomic_write(tmp_path):
    # The rename onto the target would replace the device itself (as root): refused by the check
    # that write_atomically runs first (checked here without writing, so a regression is harmless).
    with pytest.raises(ValueError, match="not a regular file"):
        check_output_file("/dev/null")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        write_atomically(fifo, lambda f: f.write(b"x"))
    with pytest.raises(ValueError, match="is a directory"):
        save_checkpoint(tmp_path, {"step": 1})


def test_read_only_out_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    # Tests run as root, whom chmod does not stop: what a read-only file system (or a directory
    # without write permission) makes os.access answer is simulated instead.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == tmp_path
                        else real_access(path, mode, **kw))
    line = one_line_error(["train-vqgan", "--out", str(tmp_path / "run")], capsys)
    assert f"cannot write into {tmp_path}" in line and "read-only" in line
    assert not (tmp_path / "run").exists()


class _FullDisk:
    """A file whose writes fail as on a full disk once 1000 bytes are in."""

    def __init__(self, f):
        self._f, self.written = f, 0

    def write(self, data):
        self.written += len(data)
        if self.written > 1000:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


class _OsWithAFullDisk:
    """The os module as fastvq.pipeline.checkpoint sees it, with a full disk under os.fdopen."""

    def __getattr__(self, name):
        return getattr(os, name)

    @staticmethod
    def fdopen(fd, *args, **kwargs):
        return _FullDisk(os.fdopen(fd, *args, **kwargs))


def test_full_disk_checkpoint_says_so_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.ckpt", {"step": 1})
    monkeypatch.setattr(checkpoint_module, "os", _OsWithAFullDisk())
    # torch.save reports the failed write as a RuntimeError about stream positions
    with pytest.raises(OSError, match="cannot write .*last.ckpt: No space left on device") as e:
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(10_000)})
    assert e.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary left


def test_full_disk_in_the_cli_is_one_line(prior, tmp_path, monkeypatch, capsys):
    ckpt, _ = prior
    monkeypatch.setattr(checkpoint_module, "os", _OsWithAFullDisk())
    png = tmp_path / "samples.png"
    line = one_line_error(["sample", "--ckpt", str(ckpt), "--out", str(png), "-n", "16"], capsys)
    assert "No space left on device" in line and "disk is full" in line and str(png) in line
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- missing extra

@pytest.mark.parametrize("module, pip", [("yaml", "pyyaml"), ("tqdm", "tqdm"), ("skimage", "scikit-image")])
def test_missing_pipeline_extra_names_the_install_command_before_any_work(module, pip, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails, as when not installed
    line = one_line_error(["demo", "--quick", "--out", str(tmp_path / "demo")], capsys)
    assert "pip install 'fastvq[pipeline]'" in line and pip in line
    assert not (tmp_path / "demo").exists()


def test_a_missing_module_of_the_extra_met_later_is_one_line_too(tmp_path, monkeypatch, capsys):
    import fastvq.pipeline.demo

    def run_demo(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setattr(fastvq.pipeline.demo, "run_demo", run_demo)
    line = one_line_error(["demo", "--out", str(tmp_path / "demo")], capsys)
    assert "matplotlib" in line and "pip install 'fastvq[pipeline]'" in line


# ----------------------------------------------------------------------------- damaged checkpoints

def _damage(state: dict, how: str) -> dict:
    state = dict(state)
    if how == "no layout":
        del state["layout"]
    elif how == "gpt shape":
        state["model"] = {**state["model"], "tok_emb.weight": torch.zeros(3, 16)}
    elif how == "vqgan shape":
        state["vqgan"] = {**state["vqgan"], "model": {**state["vqgan"]["model"],
                                                      "quantize.embedding.weight": torch.zeros(5, 4)}}
    elif how == "size 0":
        state["layout"] = {**state["layout"], "size": 0}
    elif how == "h 0":
        state["layout"] = {**state["layout"], "h": 0}
    return state


@pytest.mark.parametrize("how, message", [
    ("no layout", "no 'layout' entry"),
    ("gpt shape", "the GPT weights do not fit"),
    ("vqgan shape", "the VQGAN weights do not fit"),
    ("size 0", "layout['size'] must be an integer >= 1, got 0"),
    ("h 0", "layout['h'] must be an integer >= 1, got 0"),
    ("empty file", "is empty (0 bytes)"),
])
def test_damaged_gpt_checkpoint_is_one_line_naming_the_file(prior, how, message, tmp_path, capsys):
    ckpt, _ = prior
    damaged = tmp_path / "damaged.ckpt"
    if how == "empty file":
        damaged.write_bytes(b"")
    else:
        torch.save(_damage(torch.load(ckpt, weights_only=True), how), damaged)
    line = one_line_error(["sample", "--ckpt", str(damaged), "--out", str(tmp_path / "s.png"), "-n", "1"], capsys)
    assert str(damaged) in line and message in line


@pytest.mark.parametrize("how, message", [("shape", "the VQGAN weights do not fit"), ("no config", "no 'config'")])
def test_damaged_vqgan_checkpoint_is_one_line_naming_the_file(trained, how, message, tmp_path, capsys):
    state = torch.load(trained / "vq" / "vqgan.ckpt", weights_only=True)
    if how == "shape":
        state["model"] = {**state["model"], "quantize.embedding.weight": torch.zeros(5, 4)}
    else:
        del state["config"]
    damaged = tmp_path / "vqgan.ckpt"
    torch.save(state, damaged)
    line = one_line_error(["train-gpt", "--config", str(trained / "gpt.yaml"), "--vqgan", str(damaged),
                           "--out", str(tmp_path / "gpt"), "--no-progress"], capsys)
    assert str(damaged) in line and message in line


# ----------------------------------------------------------------------------- API arguments

def _tiny_gpt():
    torch.manual_seed(0)
    return GPT(vocab_size=10, block_size=16, n_layer=1, n_head=2, n_embd=16, window=8).eval()


@pytest.mark.parametrize("token", [10, 12, -1])
def test_out_of_range_prefix_tokens_name_the_argument_and_the_range(token):
    gpt = _tiny_gpt()
    with pytest.raises(ValueError, match=rf"sample_with_past: the prefix x holds token {token}, outside the "
                                         r"vocabulary \[0, 10\)"):
        sample_with_past(torch.tensor([[1, token]]), gpt, 3)
    with pytest.raises(ValueError, match=r"GPT.prefill: idx holds token .* \[0, 10\)"):
        gpt.prefill(torch.tensor([[token]]), gpt.new_cache(1))
    cache = gpt.new_cache(1)
    gpt.prefill(torch.tensor([[1]]), cache)
    before = cache.k.clone()
    with pytest.raises(ValueError, match=r"GPT.step: idx_new holds token .* \[0, 10\)"):
        gpt.step(torch.tensor([[token]]), cache, 1)
    assert torch.equal(cache.k, before)  # refused before the cache is touched
    with pytest.raises(ValueError, match=r"GPT: idx holds token .* \[0, 10\)"):
        gpt(torch.tensor([[0, token]]))


def test_top_k_beyond_int64_is_a_clear_error():
    with pytest.raises(ValueError, match="top_k must be an integer >= 1 that fits in int64"):
        sample_logits(torch.randn(2, 5), top_k=2 ** 64)
    with pytest.raises(ValueError, match="top_k"):
        sample_with_past(torch.tensor([[1]]), _tiny_gpt(), 2, top_k=2 ** 64)
    assert sample_logits(torch.randn(2, 5), top_k=2 ** 62).shape == (2,)  # large but valid: keeps every token


def test_fp16_cache_with_an_fp32_model_is_a_clear_error():
    gpt = _tiny_gpt()
    with pytest.raises(TypeError, match="cache is torch.float16 .* model computes torch.float32"):
        sample_with_past(torch.tensor([[1]]), gpt, 3, cache=gpt.new_cache(1, dtype=torch.float16))


@pytest.mark.parametrize("kwargs, name", [({"restart_threshold": "x"}, "restart_threshold"),
                                          ({"beta": math.nan}, "beta"), ({"beta": math.inf}, "beta")])
def test_vector_quantizer_refuses_bad_numbers_by_name(kwargs, name):
    with pytest.raises(ValueError, match=f"VectorQuantizer: {name} must be a finite number"):
        VectorQuantizer(8, 4, **kwargs)


def test_config_refuses_beta_nan(tmp_path, capsys):
    with pytest.raises(ConfigError, match="beta must be a finite number"):
        load_config("vqgan", None, {"model.beta": math.nan})
    cfg = _yaml(tmp_path, "nan.yaml", {"model": {"beta": math.nan}})
    assert "beta must be a finite number" in one_line_error(["train-vqgan", "--config", cfg, "--out",
                                                             str(tmp_path / "x")], capsys)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("pkeep", ["2", "0", "-0.5", "nan"])
def test_pkeep_outside_0_1_is_refused(pkeep, tmp_path, capsys):
    line = one_line_error(["train-gpt", "--pkeep", pkeep, "--vqgan", str(tmp_path / "none.ckpt"),
                           "--out", str(tmp_path / "gpt")], capsys)
    assert "train.pkeep" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_says_so(prior, tmp_path, capsys):
    ckpt, _ = prior
    line = one_line_error(["sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s.png"), "--device", "cuda"], capsys)
    assert "CUDA is not available" in line and "corrupt" not in line
    assert "not a device" in one_line_error(["train-vqgan", "--device", "gpu", "--out", str(tmp_path / "x")], capsys)
    with pytest.raises(ValueError, match="CUDA is not available"):
        load_checkpoint(ckpt, map_location="cuda")


# ----------------------------------------------------------------------------- pipeline honesty

def test_vqgan_checkpoint_records_its_data_and_train_gpt_uses_it(trained, prior):
    ckpt, stdout = prior
    folder = str((trained / "images").resolve())
    assert load_checkpoint(trained / "vq" / "vqgan.ckpt")["data_source"] == folder
    assert load_checkpoint(trained / "vq" / "last.ckpt")["data_source"] == folder
    assert f"no --data given: training on the VQGAN's data, {folder}" in stdout
    state = load_checkpoint(ckpt)
    assert state["layout"]["class_names"] == ["cats", "dogs"] and state["data_source"] == folder


def test_explicit_data_wins_over_the_recorded_one(trained, tmp_path, capsys):
    assert main(["train-gpt", "--config", str(trained / "gpt.yaml"), "--vqgan", str(trained / "vq" / "vqgan.ckpt"),
                 "--data", "embedded:brick,grass", "--out", str(tmp_path / "gpt"), "--no-progress"]) == 0
    assert "no --data given" not in capsys.readouterr().out
    state = load_checkpoint(tmp_path / "gpt" / "gpt.ckpt")
    assert state["layout"]["class_names"] == ["brick", "grass"] and state["data_source"] == "embedded:brick,grass"


def test_a_vqgan_checkpoint_without_the_record_falls_back_to_the_embedded_textures_and_says_so(tmp_path):
    from fastvq.pipeline.train_gpt import _default_data

    lines = []
    assert _default_data(None, None, Path("old/vqgan.ckpt"), lines.append) == "embedded"
    assert "does not record its training data" in lines[0] and "--data" in lines[0]
    with pytest.raises(ValueError, match="no longer a directory; pass --data"):
        _default_data(None, str(tmp_path / "gone"), Path("vqgan.ckpt"), lines.append)


def test_progress_prints_plain_lines_without_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv("FASTVQ_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress(total=5, desc="train-x", interval=0.0)
    assert bar.disable  # no bar drawn
    for _ in range(5):
        bar.set_postfix(loss="0.5")
        bar.update(1)
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].startswith("train-x: 1/5 (20%)") and lines[-1].startswith("train-x: 5/5 (100%)")
    assert "loss=0.5" in lines[-1] and "left" in lines[0]

    bar = progress(total=1000, desc="slow", initial=10, interval=3600.0)  # a resumed run: first, then last
    for _ in range(990):
        bar.update(1)
    assert [line.split(",")[0] for line in capsys.readouterr().out.splitlines()] == ["slow: 11/1000 (1%)",
                                                                                   "slow: 1000/1000 (100%)"]
    assert list(progress(range(3), desc="it", interval=3600.0)) == [0, 1, 2]
    assert capsys.readouterr().out.count("it: ") == 2
    bar = progress(total=3, enabled=False)  # --no-progress: silent
    bar.update(3)
    monkeypatch.setenv("FASTVQ_PROGRESS", "0")
    progress(total=3).update(3)
    assert capsys.readouterr().out == ""
