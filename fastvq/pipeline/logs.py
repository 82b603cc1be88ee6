"""What a training run leaves for people to read: a metrics CSV, loss-curve plots, image grids, a progress bar.

MetricsLog keeps one CSV row per logged step ("step" then one column per metric, in order of first
appearance). A metric that appears later (the GAN loss once the discriminator starts) adds a
column: the file is rewritten with the wider header, earlier rows left blank there. On resume from
a checkpoint at step s, rows with step > s (logged after that checkpoint by the run that died) are
dropped, so the curves never hold two histories. Rewrites go through checkpoint.write_atomically,
so a kill never leaves half a CSV or half a PNG.

Metric names of the form "group/name" ("loss/rec", "loss/vq") share a subplot in plot_curves;
other names get one each. Only the main process (distributed.is_main_process) should write any of
these.
"""
from __future__ import annotations

import csv
import math
import numbers
import os
import sys
import time
from pathlib import Path

import torch

from .._checks import check_int
from .checkpoint import write_atomically
from .distributed import is_main_process


def read_metrics(path) -> tuple[list[int], dict[str, list[float]]]:
    """(steps, {metric: values}) from a MetricsLog CSV; a blank cell reads as nan."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0][:1] != ["step"]:
        raise ValueError(f"read_metrics: {path} is not a metrics CSV (its first column must be 'step')")
    header, body = rows[0], rows[1:]
    steps = [int(row[0]) for row in body]
    columns = {name: [float(row[i]) if i < len(row) and row[i] != "" else math.nan for row in body]
               for i, name in enumerate(header) if i > 0}
    return steps, columns


class MetricsLog:
    """Append-only CSV of metrics per step; see the module docstring.

    resume_step=None starts a new file (replacing any old one); resume_step=s keeps the existing
    file's rows with step <= s and appends after them.
    """

    def __init__(self, path, resume_step: int | None = None):
        self.path = Path(path)
        self.columns = ["step"]
        if resume_step is None or not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.unlink(missing_ok=True)
            return
        steps, columns = read_metrics(self.path)
        self.columns += list(columns)
        kept = [[step] + [columns[name][i] for name in columns] for i, step in enumerate(steps) if step <= resume_step]
        self._rewrite(kept)

    def append(self, step: int, metrics) -> None:
        """Add the row for `step`; metrics maps names to numbers (or one-element tensors)."""
        check_int("MetricsLog.append", "step", step, 0)
        values = {name: self._number(name, value) for name, value in metrics.items()}
        new = [name for name in values if name not in self.columns]
        if new:
            rows = self._rows()
            self.columns += new
            self._rewrite(rows)
        with open(self.path, "a", newline="") as f:
            if f.tell() == 0:
                csv.writer(f).writerow(self.columns)
            csv.writer(f).writerow([step] + [_cell(values.get(name, math.nan)) for name in self.columns[1:]])

    @staticmethod
    def _number(name, value) -> float:
        if name == "step" or not isinstance(name, str):
            raise ValueError(f"MetricsLog.append: metric names must be strings other than 'step', got {name!r}")
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"MetricsLog.append: metric {name} must be a number, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"MetricsLog.append: metric {name} must be a number, got {value!r}")
        return float(value)

    def _rows(self) -> list[list]:
        if not self.path.exists():
            return []
        steps, columns = read_metrics(self.path)
        return [[step] + [columns[name][i] for name in columns] for i, step in enumerate(steps)]

    def _rewrite(self, rows: list[list]) -> None:
        def write(f):
            writer = csv.writer(f)
            writer.writerow(self.columns)
            for row in rows:
                padded = row + [math.nan] * (len(self.columns) - len(row))
                writer.writerow([row[0]] + [_cell(v) for v in padded[1:]])

        write_atomically(self.path, write, text=True)


def _cell(value: float) -> str:
    return "" if math.isnan(value) else format(value, ".7g")


def metric_groups(names) -> dict[str, list[str]]:
    """{group: metric names}: "loss/rec" and "loss/vq" form group "loss", a name without "/" is its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(name.split("/", 1)[0], []).append(name)
    return groups


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over about 1/25 of the points, narrowing to the raw value at the ends;
    unlike an exponential average it does not lag behind the raw line."""
    half = len(values) // 50
    prefix = [0.0]
    for value in values:
        prefix.append(prefix[-1] + value)
    smoothed = []
    for i in range(len(values)):
        width = min(half, i, len(values) - 1 - i)  # symmetric, so the ends are not pulled inwards
        smoothed.append((prefix[i + width + 1] - prefix[i - width]) / (2 * width + 1))
    return smoothed


def plot_curves(csv_path, png_path, title: str | None = None):
    """Plot a MetricsLog CSV to a PNG: one subplot per metric group, each metric's raw values faint
    and a smoothed line over them, log-y for groups that are positive and span more than 10x.
    Returns the matplotlib Figure (already saved)."""
    from matplotlib.figure import Figure  # a bare Figure draws with Agg: no pyplot, no display needed

    steps, columns = read_metrics(csv_path)
    if not steps:
        raise ValueError(f"plot_curves: {csv_path} has no rows to plot")
    groups = metric_groups(columns)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), dpi=100, layout="constrained")
    for k, (group, names) in enumerate(groups.items()):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        finite = []
        for name in names:
            points = [(s, v) for s, v in zip(steps, columns[name]) if math.isfinite(v)]
            if not points:
                continue
            xs, ys = zip(*points)
            finite += ys
            (line,) = ax.plot(xs, ys, alpha=0.25, linewidth=0.8, marker="." if len(xs) < 3 else None)
            ax.plot(xs, _smooth(list(ys)), color=line.get_color(), linewidth=1.5, label=name)
        if finite and min(finite) > 0 and max(finite) > 10 * min(finite):
            ax.set_yscale("log")
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(names) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    write_atomically(png_path, lambda f: fig.savefig(f, format="png"))
    return fig


def save_image_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2, zoom: int = 1) -> Path:
    """Write (B, 3, H, W) images in [-1, 1] as a PNG grid, `nrow` images per row, separated and
    framed by `padding` black pixels. Values outside [-1, 1] are clipped. zoom > 1 enlarges every
    pixel to zoom x zoom (small crops stay visible in a report). Returns the Path."""
    from PIL import Image

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"save_image_grid: images must be a (B, 3, H, W) tensor with B >= 1, got {shape}")
    check_int("save_image_grid", "nrow", nrow, 1)
    check_int("save_image_grid", "padding", padding, 0)
    check_int("save_image_grid", "zoom", zoom, 1)
    if zoom > 1:
        images = images.repeat_interleave(zoom, dim=2).repeat_interleave(zoom, dim=3)
    pixels = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    count, _, height, width = pixels.shape
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    grid = torch.zeros(3, rows * (height + padding) + padding, cols * (width + padding) + padding, dtype=torch.uint8)
    for i, image in enumerate(pixels):
        top = padding + (i // cols) * (height + padding)
        left = padding + (i % cols) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    return write_atomically(path, lambda f: picture.save(f, format="PNG"))


def progress(iterable=None, total: int | None = None, desc: str | None = None, enabled: bool = True,
             initial: int = 0, interval: float = 30.0):
    """A tqdm bar on stderr, shown only when `enabled`, on the main process, and when stderr is a
    terminal; FASTVQ_PROGRESS=1 shows it without a terminal, FASTVQ_PROGRESS=0 never. `initial`
    starts the count there (a resumed run). Without a terminal (a batch job's log, a pipe) and
    without FASTVQ_PROGRESS, an enabled bar on the main process prints a plain line to stdout
    instead: at the first update, then at most every `interval` seconds, and at the end
    ("train-gpt: 120/400 (30%), 2.1 it/s, 2m13s left, loss=3.200"). A hidden bar is still a
    tqdm: iterating, .update() and .set_postfix() work (and print nothing when disabled)."""
    from tqdm import tqdm

    forced = os.environ.get("FASTVQ_PROGRESS", "")
    if forced not in ("", "0", "1"):
        raise ValueError(f"FASTVQ_PROGRESS must be 0 or 1 (or unset), got {forced!r}")
    wanted = sys.stderr.isatty() if forced == "" else forced == "1"
    show = bool(enabled) and wanted and is_main_process()
    if not show and forced == "" and bool(enabled) and is_main_process():
        return _plain_progress_class(tqdm)(iterable, total=total, desc=desc, initial=initial, interval=interval)
    return tqdm(iterable, total=total, desc=desc, initial=initial, disable=not show, file=sys.stderr,
                dynamic_ncols=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _plain_progress_class(tqdm):
    """A disabled tqdm (draws nothing) that prints a plain progress line now and then; see progress.
    Made on demand: tqdm is an optional dependency, imported only when a bar is asked for."""

    class PlainProgress(tqdm):
        def __init__(self, iterable=None, *, total=None, desc=None, initial=0, interval=30.0):
            super().__init__(iterable, total=total, desc=desc, initial=initial, disable=True)
            self.label, self.interval, self.postfix = desc or "progress", float(interval), ""
            self._start_n, self._lines = self.n, 0
            self._start = self._last = time.monotonic()

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.update(1)

        def update(self, n=1):
            self.n += n
            now = time.monotonic()
            if self._lines == 0 or now - self._last >= self.interval or (self.total and self.n >= self.total):
                self._last = now
                self._lines += 1
                print(self.line(now), flush=True)

        def line(self, now: float | None = None) -> str:
            elapsed = (time.monotonic() if now is None else now) - self._start
            done = self.n - self._start_n
            rate = done / elapsed if elapsed > 0 else 0.0
            text = f"{self.label}: {self.n}"
            if self.total:
                text += f"/{self.total} ({100 * self.n / self.total:.0f}%)"
            if rate > 0:
                text += f", {rate:.3g} it/s"
                if self.total and self.n < self.total:
                    text += f", {_duration((self.total - self.n) / rate)} left"
            return text + (f", {self.postfix}" if self.postfix else "")

    return PlainProgress
