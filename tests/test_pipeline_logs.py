"""fastvq.pipeline.logs: the metrics CSV (new columns, resume), curve plots, image grids, progress bars."""
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastvq.pipeline.distributed import is_main_process
from fastvq.pipeline.logs import MetricsLog, metric_groups, plot_curves, progress, read_metrics, save_image_grid


def lines(path):
    return path.read_text().splitlines()


def test_metrics_log_adds_columns_as_they_appear(tmp_path):
    path = tmp_path / "run" / "metrics.csv"
    log = MetricsLog(path)
    log.append(1, {"loss/rec": 0.5, "lr": torch.tensor(1e-4)})
    log.append(2, {"loss/rec": 0.25})
    log.append(3, {"loss/rec": 0.125, "loss/gan": 2.0})  # the discriminator starts
    assert lines(path) == ["step,loss/rec,lr,loss/gan", "1,0.5,0.0001,", "2,0.25,,", "3,0.125,,2"]
    steps, columns = read_metrics(path)
    assert steps == [1, 2, 3] and list(columns) == ["loss/rec", "lr", "loss/gan"]
    assert columns["loss/rec"] == [0.5, 0.25, 0.125] and math.isnan(columns["lr"][1])
    assert [p.name for p in path.parent.iterdir()] == ["metrics.csv"]  # no temporary left


def test_metrics_log_resume_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.append(step, {"loss": float(step)})
    resumed = MetricsLog(path, resume_step=3)  # the run died after step 5; its checkpoint was at 3
    resumed.append(4, {"loss": 40.0, "psnr": 20.0})
    assert lines(path) == ["step,loss,psnr", "1,1,", "2,2,", "3,3,", "4,40,20"]
    MetricsLog(path)  # a new run (no resume) starts an empty file
    assert not path.exists()
    MetricsLog(tmp_path / "never.csv", resume_step=10).append(11, {"loss": 1.0})  # resume without a CSV yet
    assert lines(tmp_path / "never.csv") == ["step,loss", "11,1"]


def test_metrics_log_refuses_bad_rows(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    with pytest.raises(ValueError, match="metric loss must be a number"):
        log.append(1, {"loss": "low"})
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        log.append(1, {"loss": torch.zeros(2)})
    with pytest.raises(ValueError, match="other than 'step'"):
        log.append(1, {"step": 1})
    with pytest.raises(ValueError, match="step must be"):
        log.append(-1, {"loss": 1.0})
    assert not (tmp_path / "metrics.csv").exists()


def test_metric_groups():
    assert metric_groups(["loss/rec", "lr", "loss/vq", "psnr/heldout"]) == {
        "loss": ["loss/rec", "loss/vq"], "lr": ["lr"], "psnr": ["psnr/heldout"]}


def test_plot_curves(tmp_path):
    log = MetricsLog(tmp_path / "metrics.csv")
    for step in range(1, 201):
        row = {"loss/rec": 1 / step + 0.01 * (step % 3), "loss/vq": 0.1 + 0.001 * step, "lr": 1e-4}
        if step % 50 == 0:
            row["psnr/heldout"] = 15 + step / 50
        log.append(step, row)
    png = tmp_path / "curves.png"
    fig = plot_curves(tmp_path / "metrics.csv", png, title="vqgan")
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["loss", "lr", "psnr"]
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "linear", "linear"]
    assert len(fig.axes[0].lines) == 4  # raw + smoothed per metric
    raw, smooth = fig.axes[0].lines[:2]
    assert raw.get_alpha() < 1 and list(raw.get_xdata()) == list(smooth.get_xdata())
    wiggle = [abs(np.diff(line.get_ydata()[50:150])).max() for line in (raw, smooth)]
    assert wiggle[1] < 0.1 * wiggle[0]  # the period-3 wiggle of loss/rec is averaged out
    vq_raw, vq_smooth = (line.get_ydata() for line in fig.axes[0].lines[2:])
    assert vq_smooth == pytest.approx(vq_raw)  # a centred average does not lag behind a straight line
    assert len(fig.axes[2].lines[0].get_xdata()) == 4  # blank cells skipped
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (1350, 320)  # 3 x 1 subplots of 4.5 x 3.2 in at 100 dpi
    (tmp_path / "empty.csv").write_text("step,loss\n")
    with pytest.raises(ValueError, match="no rows"):
        plot_curves(tmp_path / "empty.csv", png)


def test_save_image_grid(tmp_path):
    images = torch.full((5, 3, 4, 6), -1.0)
    images[1] = 1.0
    images[2, 0] = 3.0  # clipped to 1
    images[3] = 0.0
    path = save_image_grid(images, tmp_path / "samples" / "grid.png", nrow=3, padding=2)
    with Image.open(path) as picture:
        pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
    assert pixels.shape == (3, 2 * (4 + 2) + 2, 3 * (6 + 2) + 2)  # two rows of three (the last one short)

    def tile(i, cols=3):
        top, left = 2 + (i // cols) * 6, 2 + (i % cols) * 8
        return pixels[:, top:top + 4, left:left + 6]

    assert (tile(0) == 0).all() and (tile(1) == 255).all() and (tile(3) == 128).all()
    assert (tile(2)[0] == 255).all() and (tile(2)[1:] == 0).all()
    assert (pixels[:, :2] == 0).all() and (pixels[:, :, 8:10] == 0).all()  # frame and gutter
    with pytest.raises(ValueError, match="\\(B, 3, H, W\\).*\\(3, 4, 6\\)"):
        save_image_grid(images[0], tmp_path / "x.png")
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(images, tmp_path / "x.png", nrow=0)


def test_progress_is_hidden_without_a_terminal_unless_asked(monkeypatch):
    monkeypatch.delenv("FASTVQ_PROGRESS", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = progress(range(3), desc="train")
    assert bar.disable and list(bar) == [0, 1, 2]
    bar.update(1)
    bar.set_postfix(loss=0.5)
    monkeypatch.setenv("FASTVQ_PROGRESS", "1")
    shown = progress(total=10, initial=3)  # a run resumed at step 3
    assert not shown.disable and shown.total == 10
    shown.update(4)
    assert shown.n == 7
    shown.close()
    assert progress(total=10, enabled=False).disable
    monkeypatch.setenv("RANK", "1")
    assert progress(total=10).disable  # only rank 0 draws


def test_progress_follows_the_terminal_and_the_override(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("FASTVQ_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(total=2)
    assert not bar.disable
    bar.close()
    monkeypatch.setenv("FASTVQ_PROGRESS", "0")
    assert progress(total=2).disable
    monkeypatch.setenv("FASTVQ_PROGRESS", "yes")
    with pytest.raises(ValueError, match="FASTVQ_PROGRESS"):
        progress(total=2)


def test_is_main_process(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    assert is_main_process()
    monkeypatch.setenv("RANK", "2")
    assert not is_main_process()
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert is_main_process()  # the process group, once there, outranks the variable
    finally:
        torch.distributed.destroy_process_group()
