"""Plots and the README tables, generated from the saved comparison results.

Reads benchmarks/results/*.json written by the compare_<op>.py scripts, draws <file>.png beside each
(quantize: time vs D, one panel per suite and K; window attention: time vs T, one panel per suite and
W; raster window: time vs T per suite and the decode tokens/s, the op's goals under its table;
sampling: tokens/s per length and batch, and the rope model's memory vs length; decode_linear:
weight bandwidth per batch; grid sampling: time to a 64 x 64 code grid per sampler and the
wavefront's memory vs height, the goals under its table), and rewrites the README between <!-- bench:<op>:start --> and
<!-- bench:<op>:end --> with one section per device (CPU first). An op without markers, quick and
dry-run results, and --print get the tables printed instead.

  python benchmarks/report.py [FILES...] [--readme README.md] [--print] [--no-plot]
  python benchmarks/report.py --expected    # what `make compare` runs and how long it should take
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from common import MIB, REPO, RESULTS_DIR, git, load_average

# a file's "benchmark"; its README marker
KINDS = ("quantize", "window_attention", "raster_window", "sampling", "decode_linear", "grid_sampling", "under_load")
# the implementations under test (fastvq_torch: an op whose auto backend fell back to its torch reference)
FASTVQ = ("fastvq", "fastvq_cpp", "fastvq_triton", "fastvq_torch")
SHORT = {"fastvq_cpp": "fastvq", "fastvq_triton": "fastvq", "fastvq_torch": "fastvq", "fastvq": "fastvq",
         "faiss": "faiss", "matmul": "matmul", "torch_reference": "torch ref", "taming": "taming", "vqp": "vq-pytorch",
         "flex": "flex", "sdpa_mask": "SDPA mask", "sdpa_causal": "SDPA causal", "taming_past": "taming past",
         "taming_uncached": "taming uncached", "fastvq_kernel": "fastvq kernel", "torch_linear": "F.linear",
         "sliding_window": "1-D window", "wavefront": "wavefront", "sequential": "sequential",
         "taming_crop": "taming crop", "taming_crop_causal": "taming crop (causal)"}
COLORS = {"fastvq_cpp": "C0", "fastvq_triton": "C0", "fastvq": "C0", "fastvq_rope": "C0", "faiss": "C1", "matmul": "C2",
          "torch_reference": "C3", "taming": "C1", "vqp": "C2", "flex": "C1", "sdpa_mask": "C2", "sdpa_causal": "C4",
          "taming_past": "C1", "taming_uncached": "C3", "fastvq_kernel": "C5", "torch_linear": "C2",
          "fastvq_torch": "C0", "sliding_window": "C5", "wavefront": "C0", "sequential": "C3", "taming_crop": "C1",
          "taming_crop_causal": "C2"}


# ----------------------------------------------------------------------------- shared

def load(paths: list[Path]) -> list[tuple[Path, dict]]:
    docs = []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {path}: {e}", file=sys.stderr)
            continue
        if doc.get("benchmark") in KINDS:
            docs.append((path, doc))
    return docs


def device_of(doc: dict) -> str:
    return doc.get("device", "cpu")


def scratch(doc: dict) -> bool:
    """Quick and dry-run results check scripts; they never go into the README."""
    return bool(doc.get("quick") or doc.get("dry_run"))


def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def fmt_bytes(b: float | None) -> str:
    if b is None:
        return "–"
    # Switch units at 1000 so that three significant digits never print as 1e+03.
    if b >= 1000 * MIB:
        return f"{b / 1024 / MIB:.3g} GiB"
    return f"{b / MIB:.3g} MiB" if b >= 1000 * 1024 else f"{b / 1024:.3g} KiB"


def fmt_mem(r: dict | None) -> str:
    return fmt_bytes(r.get("peak_extra_bytes")) if r else "–"


def fmt_rate(flop_per_s: float | None, device: str) -> str:
    if flop_per_s is None:
        return "–"
    return f"{flop_per_s / 1e12:.3g} TFLOP/s" if device == "cuda" else f"{flop_per_s / 1e9:.3g} GFLOP/s"


def ratio(theirs: float | None, mine: float | None) -> str:
    return f"{theirs / mine:.2f}×" if mine and theirs else "–"


def ok(r: dict) -> bool:
    return "error" not in r and "skipped" not in r and "median_s" in r


def rel(p: Path):
    return p.resolve().relative_to(REPO) if p.resolve().is_relative_to(REPO) else p


def short_commit(m: dict) -> str | None:
    return (m.get("git_commit") or "")[:7] or None


def load_text(machine: dict) -> str:
    loads = [f"{machine[f'load_average_1_5_15min_at_{when}'][0]:.2f} at {when}" for when in ("start", "end")
             if f"load_average_1_5_15min_at_{when}" in machine]
    return f"; load average {', '.join(loads)}" if loads else ""


ISA_NAMES = {"avx512": "AVX-512", "avx2": "AVX2 + FMA", "baseline": "x86-64 baseline"}


def isa_name(m: dict) -> str:
    """The CPU variant a run's machine record says fastvq's kernels ran (csrc/isa.h), in words."""
    return ISA_NAMES.get(m.get("cpu_isa"), m.get("cpu_isa") or "no cpp")


def isa_text(m: dict) -> str:
    return f"{isa_name(m)} kernels" if "cpu_isa" in m else "kernel variant not recorded"


def where(doc: dict) -> str:
    """The machine, in one phrase: the GPU on CUDA, else the CPU, its threads and fastvq's kernel variant."""
    m = doc["machine"]
    if device_of(doc) == "cuda":
        return f"**{m.get('device', 'CUDA GPU')}**, triton {m.get('triton')}"
    return f"**{m['cpu']}**, {m['threads']} threads, {isa_text(m)}"


def case_of(doc: dict, r: dict) -> tuple:
    return tuple((key, r.get(key)) for key in doc.get("case_keys", ()))


def isa_comparison(doc: dict, kind_docs: list) -> list[str]:
    """For a run on a forced kernel variant (--isa), its times against the same cases of the full run
    on the default variant: every implementation, anchors included, whose ratio near 1 says how much
    of the difference is the machine drifting between the two runs."""
    m = doc["machine"]
    base = next(((p, d) for p, d in kind_docs if d is not doc and device_of(d) == "cpu" and not scratch(d)
                 and not d.get("only") and d["machine"].get("cpu_isa") not in (None, m.get("cpu_isa"))
                 and d["machine"].get("parallel") == m.get("parallel")), None)
    if base is None or not doc.get("case_keys"):
        return []
    (base_path, base_doc), other = base, isa_name(m)
    # matched by their JSON text: a case may hold a dict (a model's shape)
    theirs = {json.dumps(case_of(doc, r)): r for r in base_doc["results"] if ok(r)}
    mine_name = isa_name(base_doc["machine"])
    rows, done = [], [r for r in doc["results"] if ok(r)]
    # a row names only what tells the cases of this table apart (the suite always)
    varying = {k for k in doc["case_keys"] if k == "suite" or (k != "min_runs" and len(
        {json.dumps(r[k]) for r in done if r.get(k) is not None}) > 1)}
    for r in done:
        b = theirs.get(json.dumps(case_of(doc, r)))
        if b is None:
            continue
        label = ", ".join(f"{k}={v}" for k, v in case_of(doc, r)
                          if k in varying and k not in ("device", "impl") and v is not None and not isinstance(v, dict))
        rows.append(f"| {label} | {doc['labels'].get(r['impl'], r['impl'])} | {fmt_time(b['median_s'])} | "
                    f"{fmt_time(r['median_s'])} | {r['median_s'] / b['median_s']:.2f}× |")
    if not rows:
        return []
    return ["", f"The same cases against the full run above ({rel(base_path)}, {mine_name} kernels, commit "
                f"{short_commit(base_doc['machine'])}): median times; the anchors do not use fastvq's kernels, "
                "so their ratio shows how far the machine drifted between the two runs.", "",
            f"| case | implementation | {mine_name} | {other} | {other} / {mine_name} time |",
            "|---|---|---:|---:|---:|", *rows]


def header(path: Path, doc: dict, extra: str = "") -> list[str]:
    m = doc["machine"]
    dirty = m.get("git_dirty_paths") or []
    shown = ", ".join(dirty[:4]) + (f" and {len(dirty) - 4} more" if len(dirty) > 4 else "")
    return [f"<!-- generated by benchmarks/report.py from {rel(path)}; edit the JSON or the script, not this text -->",
            f"{where(doc)}, torch {m['torch']}{extra}; {m['date_utc'][:10]}, commit {short_commit(m)}"
            + (f" (uncommitted changes: {shown})" if dirty else "")
            + (" (quick sizes)" if doc.get("quick") else "") + load_text(m) + "."]


def not_measured(doc: dict, suite: str, where_fn) -> list[str]:
    """One line per (implementation, reason) of the suite's skipped or failed cases, listing where."""
    missing: dict[tuple[str, str], list[str]] = {}
    for r in doc["results"]:
        if r["suite"] == suite and ("error" in r or "skipped" in r):
            why = r.get("skipped") or f"error: {r['error']}"
            missing.setdefault((SHORT.get(r["impl"], r["impl"]), why), []).append(where_fn(r))
    return [f"Not measured: {impl} ({', '.join(w)}): {why}" for (impl, why), w in missing.items()]


def columns(doc: dict) -> str:
    """What each column name stands for, for the implementations the file holds."""
    present = {r["impl"] for r in doc["results"]}
    return "Columns: " + "; ".join(f"{SHORT[k]} = {v}" for k, v in doc["labels"].items() if k in SHORT and k in present) + "."


def impls_in(doc: dict, suite: str) -> list[str]:
    """Implementations of a suite in the order of the script's labels (fastvq first)."""
    present = {r["impl"] for r in doc["results"] if r["suite"] == suite}
    return sorted((i for i in doc["labels"] if i in present), key=lambda i: i not in FASTVQ)


def comparison_table(doc: dict, suite: str, key, key_title: str, key_text, extra_cols=(), mem=fmt_mem) -> list[str]:
    """| key | fastvq | anchors... | speedup vs each anchor | extra columns | mem of each |, rows by key(result)."""
    impls = impls_in(doc, suite)
    ours = next((i for i in impls if i in FASTVQ), None)
    if ours is None:
        return []
    anchors = [i for i in impls if i != ours]
    table: dict = {}
    for r in doc["results"]:
        if r["suite"] == suite and ok(r):
            for k in key(r):
                table.setdefault(k, {})[r["impl"]] = r
    name = lambda i: SHORT.get(i, i)  # noqa: E731
    head = ([key_title, name(ours)] + [name(a) for a in anchors] + [f"speedup vs {name(a)}" for a in anchors]
            + [title for title, _ in extra_cols] + [f"mem {name(i)}" for i in [ours] + anchors])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, row in sorted(table.items()):
        mine = row.get(ours, {}).get("median_s")
        cells = [key_text(map(str, k)), fmt_time(mine)] + [fmt_time(row.get(a, {}).get("median_s")) for a in anchors]
        cells += [ratio(row.get(a, {}).get("median_s"), mine) for a in anchors]
        cells += [cell(row, ours) for _, cell in extra_cols]
        cells += [mem(row.get(i)) for i in [ours] + anchors]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def matplotlib_pyplot():
    """pyplot on the Agg backend, or None where matplotlib is missing (a bare GPU machine): no plots then."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def log2_axis(ax, ticks, label):
    import matplotlib.ticker

    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel(label)


def save(fig, plt, out: Path, title: str) -> Path:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_title(op: str, doc: dict) -> str:
    m = doc["machine"]
    on = m.get("device") if device_of(doc) == "cuda" else f"{m['cpu']} ({m['threads']} threads)"
    return f"fastvq {op} on {on}, {m['date_utc'][:10]}"


# ----------------------------------------------------------------------------- quantize

Q_SUITES = {"nearest_code": "nearest_code (N x D queries against a K x D codebook)",
            "module_forward": "VQ module, forward (inference)",
            "module_forward_backward": "VQ module, forward + backward (training step)"}


def q_key(doc: dict):
    """Rows by (N, K, D), with dtype and metric where the file has more than one."""
    res = [r for r in doc["results"] if r["suite"] == "nearest_code"]
    extra = [f for f in ("dtype", "metric") if len({r.get(f) for r in res}) > 1]
    return (lambda r: [(r["N"], r["K"], r["D"], *(r.get(f) for f in extra))]), ", ".join(["N, K, D", *extra])


def q_peaks(doc: dict) -> dict:
    """dtype -> the square matmul's FLOP/s (the device's matmul throughput)."""
    return {r.get("dtype", "float32"): r["flop"] / r["median_s"] for r in doc["results"]
            if r["suite"] == "matmul_peak" and ok(r)}


def q_markdown(path: Path, doc: dict, png: Path | None) -> str:
    m, device = doc["machine"], device_of(doc)
    versions = {"faiss": m.get("faiss-cpu", m.get("faiss"))} | {
        d: m.get(d) for d in ("taming-transformers-rom1504", "vector-quantize-pytorch")}
    parts = header(path, doc, "".join(f", {d} {v}" for d, v in versions.items()))
    peaks = q_peaks(doc)
    parts += ["", "Times are medians of several runs after warm-up; speedup = anchor time / fastvq time (above 1: fastvq "
              "is faster); mem = peak extra memory of one call, outputs included, and in brackets as a multiple of one "
              "N×K fp32 matrix. " + columns(doc)]
    if peaks:
        parts += ["", "Matmul throughput of this device (a square matmul, the yardstick for nearest_code's rate): "
                  + ", ".join(f"{dt} {fmt_rate(v, device)}" for dt, v in peaks.items()) + "."]
    if png is not None:
        parts += ["", f"![quantize benchmark]({rel(png)})"]

    def mem(r):
        if r is None or r.get("peak_extra_bytes") is None:
            return "–"
        return f"{fmt_bytes(r['peak_extra_bytes'])} ({r['peak_extra_bytes'] / r['nk_fp32_bytes']:.2g}×)"

    key, title = q_key(doc)
    for suite, suite_title in Q_SUITES.items():
        if not any(r["suite"] == suite for r in doc["results"]):
            continue
        if suite == "nearest_code":
            def rate(row, ours):
                r = row.get(ours)
                return fmt_rate(r["flop"] / r["median_s"], device) if r and "flop" in r else "–"

            def of_peak(row, ours):
                r = row.get(ours)
                peak = peaks.get(r.get("dtype", "float32")) if r and "flop" in r else None
                return f"{r['flop'] / r['median_s'] / peak:.0%}" if peak else "–"

            def agree(row, ours):
                r = row.get(ours)
                return f"{r['agree_with_reference']:.4f}" if r and "agree_with_reference" in r else "–"

            extra = [("fastvq rate", rate), ("of matmul peak", of_peak), ("agrees with ref", agree)]
            lines = comparison_table(doc, suite, key, title, ", ".join, extra, mem)
        else:
            lines = comparison_table(doc, suite, lambda r: [(r["N"], r["K"], r["D"])], "N, K, D", ", ".join, [], mem)
        notes = not_measured(doc, suite, lambda r: f"N={r['N']} K={r['K']} D={r['D']}")
        parts += ["", f"**{suite_title}**", ""] + lines + ([""] + notes if notes else [])
    return "\n".join(parts)


def q_plot(doc: dict, out: Path) -> Path | None:
    plt = matplotlib_pyplot()
    suites = [s for s in Q_SUITES if any(r["suite"] == s and ok(r) for r in doc["results"])]
    if plt is None or not suites:
        return None
    ks = {s: sorted({r["K"] for r in doc["results"] if r["suite"] == s}) for s in suites}
    cols = max(map(len, ks.values()))
    fig, axes = plt.subplots(len(suites), cols, figsize=(5.5 * cols, 3.8 * len(suites)), squeeze=False)
    for row, suite in enumerate(suites):
        res = [r for r in doc["results"] if r["suite"] == suite and ok(r) and r.get("metric", "l2") == "l2"]
        n_main = max({r["N"] for r in res}, key=lambda n: sum(r["N"] == n for r in res))  # leave out the odd cases
        dtypes = sorted({r.get("dtype", "float32") for r in res})
        for ax in axes[row][len(ks[suite]):]:
            ax.set_visible(False)
        for col, k in enumerate(ks[suite]):
            ax = axes[row][col]
            for impl in impls_in(doc, suite):
                for dt in dtypes:
                    pts = sorted((r["D"], r["median_s"]) for r in res if r["impl"] == impl and r["K"] == k
                                 and r["N"] == n_main and r.get("dtype", "float32") == dt)
                    if pts:
                        label = doc["labels"][impl] + (f" {dt}" if len(dtypes) > 1 else "")
                        style = dict(lw=2.5, zorder=3) if impl in FASTVQ else dict(lw=1.2)
                        ax.plot(*zip(*pts), marker="o", label=label, color=COLORS.get(impl),
                                ls="-" if dt == dtypes[0] else "--", **style)
            log2_axis(ax, sorted({r["D"] for r in res if r["K"] == k}) or [1], "D (vector dimension)")
            ax.set_yscale("log")
            ax.set_ylabel("median time (s)")
            ax.set_title(f"{suite}: N={n_main}, K={k}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    return save(fig, plt, out, plot_title("quantize", doc))


# ----------------------------------------------------------------------------- window attention

WA_SUITES = {"forward": "window attention, forward (inference)",
             "forward_backward": "window attention, forward + backward (training step)"}


def wa_windows(doc: dict) -> list[int]:
    return sorted({r["W"] for r in doc["results"] if r["W"] is not None})


def wa_key(doc: dict):
    """Rows by (T, W); SDPA is_causal (W = None: no window) goes into every W row of its T."""
    windows = wa_windows(doc)
    rows = {(r["T"], r["W"]) for r in doc["results"] if r["W"] is not None}
    return lambda r: [(r["T"], w) for w in windows if (r["T"], w) in rows] if r["W"] is None else [(r["T"], r["W"])]


def wa_scaling(doc: dict) -> list[str]:
    """fastvq's time ratio between the two largest T at every W: how close to linear in T it is."""
    lines = []
    for suite in WA_SUITES:
        res = {(r["T"], r["W"]): r["median_s"] for r in doc["results"]
               if r["suite"] == suite and r["impl"] in FASTVQ and ok(r)}
        ts = sorted({t for t, _ in res})
        if len(ts) < 2:
            continue
        t0, t1 = ts[-2], ts[-1]
        cells = [f"W={w} {res[(t1, w)] / res[(t0, w)]:.2f}" for w in wa_windows(doc)
                 if (t0, w) in res and (t1, w) in res]
        if cells:
            lines.append(f"{suite.replace('_', ' + ')} {' / '.join(cells)}")
    if not lines:
        return []
    ts = sorted({r["T"] for r in doc["results"]})
    return [f"fastvq's time against T at fixed W, T = {ts[-2]} → {ts[-1]} (linear: {ts[-1] / ts[-2]:.2f}): "
            + "; ".join(lines) + "."]


def wa_markdown(path: Path, doc: dict, png: Path | None) -> str:
    device = device_of(doc)
    parts = header(path, doc, f"; {doc['method']['shape']}")
    parts += ["", "Times are medians of several runs after warm-up; speedup = anchor time / fastvq time (above 1: fastvq "
              "is faster); mem = peak extra memory of one call, outputs (and gradients) included; band rate = the "
              "FLOPs inside the window / fastvq's time. W is the window (query i sees keys i − W < j ≤ i); SDPA causal "
              "ignores it (full causal attention, the same numbers in every W row). FlexAttention's compile time is "
              "excluded. " + columns(doc)]
    if png is not None:
        parts += ["", f"![window attention benchmark]({rel(png)})"]

    def band(row, ours):
        r = row.get(ours)
        return fmt_rate(r["band_tflop_per_s"] * 1e12, device) if r and "band_tflop_per_s" in r else "–"

    for suite, title in WA_SUITES.items():
        if not any(r["suite"] == suite for r in doc["results"]):
            continue
        lines = comparison_table(doc, suite, wa_key(doc), "T, W", ", ".join, [("fastvq band rate", band)])
        notes = not_measured(doc, suite, lambda r: f"T={r['T']}" + ("" if r["W"] is None else f" W={r['W']}"))
        parts += ["", f"**{title}**", ""] + lines + ([""] + notes if notes else [])
    scaling = wa_scaling(doc)
    if scaling:
        parts += [""] + scaling
    return "\n".join(parts)


def wa_plot(doc: dict, out: Path) -> Path | None:
    plt = matplotlib_pyplot()
    suites = [s for s in WA_SUITES if any(r["suite"] == s and ok(r) for r in doc["results"])]
    windows = wa_windows(doc)
    if plt is None or not suites or not windows:
        return None
    key = wa_key(doc)
    fig, axes = plt.subplots(len(suites), len(windows), figsize=(5 * len(windows), 3.8 * len(suites)), squeeze=False)
    for row, suite in enumerate(suites):
        for col, w in enumerate(windows):
            ax = axes[row][col]
            for impl in impls_in(doc, suite):
                pts = sorted((r["T"], r["median_s"]) for r in doc["results"]
                             if r["suite"] == suite and r["impl"] == impl and ok(r) and (r["T"], w) in key(r))
                if pts:
                    style = (dict(lw=2.5, zorder=3) if impl in FASTVQ
                             else dict(lw=1.2, ls="--" if impl == "sdpa_causal" else "-"))
                    ax.plot(*zip(*pts), marker="o", label=doc["labels"][impl], color=COLORS.get(impl), **style)
            log2_axis(ax, sorted({r["T"] for r in doc["results"] if r["W"] == w}), "T (sequence length)")
            ax.set_yscale("log")
            ax.set_ylabel("median time (s)")
            ax.set_title(f"{suite}: W={w}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    return save(fig, plt, out, plot_title("sliding-window attention", doc))


# ----------------------------------------------------------------------------- raster-window attention

RW_SUITES = {"forward": "raster-window attention, forward (inference)",
             "forward_backward": "raster-window attention, forward + backward (training step)"}
RW_GOALS = {"flex_forward": 1.5, "sdpa_mask_fb_grid": 64, "sdpa_mask_fb": 10.0, "scaling": 4.5, "wavefront": 3.0}


def rw_times(doc: dict) -> dict:
    """(suite, impl, grid height) -> median seconds of the attention cases that ran."""
    return {(r["suite"], r["impl"], r["height"]): r["median_s"] for r in doc["results"]
            if r["suite"] in RW_SUITES and ok(r)}


def rw_ours(doc: dict) -> str | None:
    return next((r["impl"] for r in doc["results"] if r["impl"] in FASTVQ), None)


def verdict(values: list[float], good) -> str:
    if not values:
        return "not measured"
    return "met" if all(good(v) for v in values) else "not met"


def rw_goals(doc: dict) -> list[str]:
    """The op's goals, each with the figures of this file and whether they are met."""
    times, ours = rw_times(doc), rw_ours(doc)
    grids = sorted({g for _, _, g in times})
    lines = []

    def vs(anchor: str, suite: str, g: int) -> float | None:
        mine, theirs = times.get((suite, ours, g)), times.get((suite, anchor, g))
        return theirs / mine if mine and theirs else None

    flex = {g: vs("flex", "forward", g) for g in grids}
    flex = {g: x for g, x in flex.items() if x is not None}
    lines.append(f"- forward ≥ {RW_GOALS['flex_forward']}× compiled FlexAttention: "
                 + (", ".join(f"{g}×{g} {x:.2f}×" for g, x in flex.items()) or "–")
                 + f" ({verdict(list(flex.values()), lambda x: x >= RW_GOALS['flex_forward'])})")
    g = RW_GOALS["sdpa_mask_fb_grid"]
    x = vs("sdpa_mask", "forward_backward", g)
    lines.append(f"- forward + backward ≥ {RW_GOALS['sdpa_mask_fb']:g}× SDPA-mask at {g}×{g}: "
                 + (f"{x:.2f}×" if x else "–")
                 + f" ({verdict([x] if x else [], lambda v: v >= RW_GOALS['sdpa_mask_fb'])})")
    cells, ratios = [], []
    for suite in RW_SUITES:
        steps = [(a, b, times[(suite, ours, b)] / times[(suite, ours, a)]) for a, b in zip(grids, grids[1:])
                 if (suite, ours, a) in times and (suite, ours, b) in times and b == 2 * a]
        ratios += [r for _, _, r in steps]
        if steps:
            cells.append(f"{suite.replace('_', ' + ')} " + ", ".join(f"{a}→{b} {r:.2f}×" for a, b, r in steps))
    paired = [r for r in doc["results"] if r["suite"] == "scaling" and ok(r)]
    if paired:  # one process, alternating blocks: the verdict's figures; the tables' ratios for reference
        table_cells = cells
        # the work grows more than 4x from a small grid (the borders cut its windows short): the
        # goal is judged per 4x the window's (query, key) pairs, time ratio / (pairs ratio / 4)
        cells = [f"{r['mode'].replace('_', ' + ')} {r['from_height']}→{r['height']} {r['ratio_median']:.2f}× for "
                 f"{r['pairs_ratio']:.2f}× the pairs = {4 * r['ratio_median'] / r['pairs_ratio']:.2f}× per 4× "
                 f"(rounds {min(r['ratios']):.2f}–{max(r['ratios']):.2f})" for r in paired]
        ratios = [4 * r["ratio_median"] / r["pairs_ratio"] for r in paired]
        how = (f"judged per 4× the window's pairs; median of {paired[0]['rounds']} rounds timing both sizes in "
               "alternating blocks in one process"
               + (f"; from the tables' medians, separate processes: {'; '.join(table_cells)}" if table_cells else ""))
    else:
        how = "from the tables' medians"
    pairs = {r["height"]: r["window_pairs"] for r in doc["results"] if r.get("window_pairs")}
    work = [f"{a}→{b} {pairs[b] / pairs[a]:.2f}×" for a, b in zip(grids, grids[1:]) if a in pairs and b in pairs]
    lines.append(f"- 4× the tokens → ≤ {RW_GOALS['scaling']}× the time (fastvq, grid side doubled): "
                 + ("; ".join(cells) or "–") + f" ({verdict(ratios, lambda v: v <= RW_GOALS['scaling'])}; {how})"
                 + (f". The work itself, (query, key) pairs in the window, grows {', '.join(work)}: the grid's borders "
                    "cut off more of a small grid's windows, so time per pair is what stays flat" if work else ""))
    dec = {r["impl"]: r for r in doc["results"] if r["suite"] == "decode" and ok(r)}
    if "wavefront" in dec or "sequential" in dec or any(r["suite"] == "decode" for r in doc["results"]):
        x = (dec["wavefront"]["tokens_per_s"] / dec["sequential"]["tokens_per_s"]
             if "wavefront" in dec and "sequential" in dec else None)
        lines.append(f"- decode: wavefront ≥ {RW_GOALS['wavefront']:g}× the tokens/s of one token a step: "
                     + (f"{x:.2f}×" if x else "–")
                     + f" ({verdict([x] if x else [], lambda v: v >= RW_GOALS['wavefront'])})")
    return lines


def rw_decode(doc: dict) -> list[str]:
    res = [r for r in doc["results"] if r["suite"] == "decode"]
    if not res:
        return []
    dec = {r["impl"]: r for r in res if ok(r)}
    seq = dec.get("sequential")
    lines = ["**decode: sample_grid at batch 1, wavefront against one token a step**", "",
             doc["method"].get("decode", "") + ".", "",
             "| decode | grid | codes timed | steps | time for the grid | tokens/s | speedup vs sequential | mem |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for impl in ("wavefront", "sequential"):
        r = dec.get(impl)
        if r is None:
            continue
        grid = r["grid"].replace("x", "×")
        if r.get("extrapolated"):
            scale = r["height"] / r["rows_measured"]
            grid += f" (first {r['rows_measured']} rows timed, time extrapolated ×{scale:g})"
        speed = ratio(r["tokens_per_s"], seq["tokens_per_s"]) if seq and impl != "sequential" else "–"
        lines.append(f"| {SHORT[impl]} | {grid} | {r['codes_measured']} | {r['steps']} | {fmt_time(r['grid_time_s'])} "
                     f"| {r['tokens_per_s']:.1f} | {speed} | {fmt_mem(r)} |")
    hashes = {r["first_rows_sha1"] for r in dec.values()}
    if len(dec) == 2:
        rows = next(iter(dec.values()))["compare_rows"]
        lines += ["", f"Same codes in both orders (first {rows} rows, hashed): {'yes' if len(hashes) == 1 else 'NO'}. "
                  f"Model: {next(iter(dec.values()))['parameters']:,} parameters."]
    notes = [f"Not measured: {SHORT.get(r['impl'], r['impl'])}: {r.get('skipped') or 'error: ' + str(r.get('error'))}"
             for r in res if not ok(r)]
    return lines + ([""] + notes if notes else [])


def rw_markdown(path: Path, doc: dict, png: Path | None) -> str:
    device = device_of(doc)
    parts = header(path, doc, f"; {doc['method']['shape']}")
    parts += ["", "Times are medians of several runs after warm-up; speedup = anchor time / fastvq time (above 1: "
              "fastvq is faster); mem = peak extra memory of one call, outputs (and gradients) included; window "
              "rate = the FLOPs of the window's (query, key) pairs / fastvq's time. The window: "
              f"{doc['method']['window']}. 1-D window = sliding_window_attention with the smallest 1-D window that "
              "holds the 2-D one (W = rows·width + left + 1: more keys per query than the 2-D window). "
              "FlexAttention's compile time is excluded. " + columns(doc)]
    if rw_ours(doc) == "fastvq_torch":
        parts += ["", "fastvq ran the torch reference here: auto falls back to it until the cpp kernel "
                      "(csrc/raster_window.cpp) is registered; the goals are the kernel's."]
    if png is not None:
        parts += ["", f"![raster-window attention benchmark]({rel(png)})"]

    def rate(row, ours):
        r = row.get(ours)
        return fmt_rate(r["window_tflop_per_s"] * 1e12, device) if r and "window_tflop_per_s" in r else "–"

    def grid_text(key):
        h, w, t = key
        return f"{h}×{w} ({t})"

    for suite, title in RW_SUITES.items():
        if not any(r["suite"] == suite for r in doc["results"]):
            continue
        lines = comparison_table(doc, suite, lambda r: [(r["height"], r["width"], r["T"])], "grid (T)", grid_text,
                                 [("fastvq window rate", rate)])
        notes = not_measured(doc, suite, lambda r: r["grid"])
        parts += ["", f"**{title}**", ""] + lines + ([""] + notes if notes else [])
    decode = rw_decode(doc)
    if decode:
        parts += [""] + decode
    parts += ["", "Goals:", ""] + rw_goals(doc)
    return "\n".join(parts)


def rw_plot(doc: dict, out: Path) -> Path | None:
    plt = matplotlib_pyplot()
    suites = [s for s in RW_SUITES if any(r["suite"] == s and ok(r) for r in doc["results"])]
    dec = [r for r in doc["results"] if r["suite"] == "decode" and ok(r)]
    if plt is None or not (suites or dec):
        return None
    panels = len(suites) + bool(dec)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        for impl in impls_in(doc, suite):
            pts = sorted((r["T"], r["median_s"]) for r in doc["results"]
                         if r["suite"] == suite and r["impl"] == impl and ok(r))
            if pts:
                style = (dict(lw=2.5, zorder=3) if impl in FASTVQ
                         else dict(lw=1.2, ls="--" if impl == "sliding_window" else "-"))
                name = f"fastvq ({impl.removeprefix('fastvq_')})" if impl in FASTVQ else SHORT.get(impl, impl)
                ax.plot(*zip(*pts), marker="o", label=name, color=COLORS.get(impl), **style)
        log2_axis(ax, sorted({r["T"] for r in doc["results"] if r["suite"] == suite}), "T (grid tokens)")
        ax.set_yscale("log")
        ax.set_ylabel("median time (s)")
        ax.set_title(suite, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if dec:
        ax = axes[0][-1]
        dec = sorted(dec, key=lambda r: r["impl"] != "wavefront")
        ax.bar([SHORT[r["impl"]] + (f" (first {r['rows_measured']} rows)" if r.get("extrapolated") else "") for r in dec],
               [r["tokens_per_s"] for r in dec], color=[COLORS[r["impl"]] for r in dec])
        ax.set_ylabel("tokens / s")
        ax.set_title(f"sample_grid {dec[0]['grid']}, batch 1 (higher is better)", fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    return save(fig, plt, out, plot_title("raster-window attention", doc))


# ----------------------------------------------------------------------------- sampling loop

def sp_markdown(path: Path, doc: dict, png: Path | None) -> str:
    m = doc["machine"]
    speed = {(r["steps"], r["B"], r["impl"]): r for r in doc["results"] if r.get("suite") == "speed"}
    rows = sorted({(n, b) for n, b, _ in speed})
    tps = lambda r: f"{r['tokens_per_s']:.0f}" if r and "tokens_per_s" in r else "–"  # noqa: E731
    parts = header(path, doc, f", taming-transformers-rom1504 {m.get('taming-transformers-rom1504')}")
    parts += ["", f"{doc['method']['model']}; {doc['method']['task']}. Tokens/s = batch × new tokens / median time of "
              "the whole sampling call; speedup = fastvq tokens/s over the anchor's; mem = peak extra memory of one call."]
    if png is not None:
        parts += ["", f"![sampling benchmark]({rel(png)})"]
    if rows:
        parts += ["", "| new tokens | batch | fastvq tok/s | taming past tok/s | taming uncached tok/s | "
                      "speedup vs past | speedup vs uncached | fastvq mem | taming past mem |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, b in rows:
            f, tp, tu = (speed.get((n, b, i)) for i in ("fastvq", "taming_past", "taming_uncached"))
            vs = lambda a: (f"{f['tokens_per_s'] / a['tokens_per_s']:.2f}×"  # noqa: E731
                            if f and a and "tokens_per_s" in f and "tokens_per_s" in a else "–")
            parts.append(f"| {n} | {b} | {tps(f)} | {tps(tp)} | {tps(tu)} | {vs(tp)} | {vs(tu)} | {fmt_mem(f)} | "
                         f"{fmt_mem(tp)} |")
    mem_rows = sorted((r for r in doc["results"] if r.get("suite") == "memory"), key=lambda r: r["steps"])
    if mem_rows:
        parts += ["", f"Memory against sequence length: {doc['labels']['fastvq_rope']}, batch 1.", "",
                  "| new tokens | " + " | ".join(str(r["steps"]) for r in mem_rows) + " |",
                  "|---|" + "---:|" * len(mem_rows),
                  "| peak extra memory | " + " | ".join(fmt_bytes(r.get("peak_extra_bytes")) for r in mem_rows) + " |",
                  "| tokens/s | " + " | ".join(tps(r) for r in mem_rows) + " |"]
    notes = [f"Not measured: {SHORT.get(r['impl'], r['impl'])} (n={r['steps']}, B={r['B']}): "
             f"{r.get('skipped') or r.get('error')}" for r in doc["results"] if "skipped" in r or "error" in r]
    if notes:
        parts += [""] + ["  \n".join(notes)]
    return "\n".join(parts)


def sp_plot(doc: dict, out: Path) -> Path | None:
    plt = matplotlib_pyplot()
    speed = [r for r in doc["results"] if r.get("suite") == "speed" and "tokens_per_s" in r]
    mem = sorted((r for r in doc["results"] if r.get("suite") == "memory" and r.get("peak_extra_bytes") is not None),
                 key=lambda r: r["steps"])
    if plt is None or (not speed and not mem):
        return None
    fig, (ax, axm) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    groups = sorted({(r["steps"], r["B"]) for r in speed})
    impls = [i for i in ("fastvq", "taming_past", "taming_uncached") if any(r["impl"] == i for r in speed)]
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        vals = {(r["steps"], r["B"]): r["tokens_per_s"] for r in speed if r["impl"] == impl}
        xs = [g + k * width for g, key in enumerate(groups) if key in vals]
        ax.bar(xs, [vals[key] for key in groups if key in vals], width, label=doc["labels"][impl], color=COLORS[impl])
    ax.set_xticks([g + width * (len(impls) - 1) / 2 for g in range(len(groups))],
                  [f"{n} tokens\nbatch {b}" for n, b in groups])
    ax.set_yscale("log")
    ax.set_ylabel("tokens / s")
    ax.set_title("sampling speed (higher is better; missing bars: skipped)", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if mem:
        axm.plot([r["steps"] for r in mem], [r["peak_extra_bytes"] / MIB for r in mem], marker="o",
                 color=COLORS["fastvq_rope"], label=doc["labels"]["fastvq_rope"])
        log2_axis(axm, [r["steps"] for r in mem], "new tokens (batch 1)")
        axm.set_ylim(bottom=0)
        axm.legend(fontsize=7)
    axm.set_ylabel("peak extra memory (MiB)")
    axm.set_title("memory vs length, rope + window", fontsize=10)
    axm.grid(True, alpha=0.3)
    return save(fig, plt, out, plot_title("cached sampling", doc))


# ----------------------------------------------------------------------------- decode_linear

def dl_markdown(path: Path, doc: dict, png: Path | None) -> str:
    parts = header(path, doc) + ["", f"{doc['method']['model']}. One call = a sweep over every layer in model order "
                                     "(each weight read once, from memory); rate = weight bytes / median time."]
    if png is not None:
        parts += ["", f"![decode_linear benchmark]({rel(png)})"]

    def gbs(row, ours):
        r = row.get(ours)
        return f"{r['gb_per_s']:.3g} GB/s" if r and "gb_per_s" in r else "–"

    parts += [""] + comparison_table(doc, "sweep", lambda r: [(r["B"],)], "batch", "".join,
                                     [("fastvq weight rate", gbs)])
    shaped = [r for r in doc["results"] if ok(r) and "shapes" in r]
    if shaped:
        impls = [i for i in impls_in(doc, "sweep") if any(r["impl"] == i for r in shaped)]
        parts += ["", "Weight rate per layer shape (each call timed on its own inside the sweeps):", "",
                  "| batch | shape | " + " | ".join(f"{SHORT.get(i, i)} GB/s" for i in impls) + " |",
                  "|---:|---|" + "---:|" * len(impls)]
        for b in sorted({r["B"] for r in shaped}):
            by_impl = {r["impl"]: {s["shape"]: s for s in r["shapes"]} for r in shaped if r["B"] == b}
            for shape in next(iter(by_impl.values())):
                parts.append(f"| {b} | {shape} | " + " | ".join(
                    f"{by_impl[i][shape]['gb_per_s']:.3g}" if i in by_impl else "–" for i in impls) + " |")
    notes = not_measured(doc, "sweep", lambda r: f"B={r['B']}")
    return "\n".join(parts + ([""] + notes if notes else []))


def dl_plot(doc: dict, out: Path) -> Path | None:
    plt = matplotlib_pyplot()
    res = [r for r in doc["results"] if ok(r)]
    if plt is None or not res:
        return None
    batches = sorted({r["B"] for r in res})
    impls = impls_in(doc, "sweep")
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        vals = {r["B"]: r["gb_per_s"] for r in res if r["impl"] == impl}
        ax.bar([g + k * width for g, b in enumerate(batches) if b in vals], [vals[b] for b in batches if b in vals],
               width, label=doc["labels"][impl], color=COLORS.get(impl))
    ax.set_xticks([g + width * (len(impls) - 1) / 2 for g in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("weight bytes / s (GB/s)")
    ax.set_title("decode-step Linears, one sweep of the model (higher is better)", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, plt, out, plot_title("decode_linear", doc))


# ----------------------------------------------------------------------------- grid sampling

GS_GOALS = {"taming_crop": 50.0, "sequential": 3.0, "memory_flat": 1.5}


def gs_grid(doc: dict) -> dict:
    """(model name, impl) -> the grid case that ran."""
    return {(r["model_name"], r["impl"]): r for r in doc["results"] if r["suite"] == "grid" and ok(r)}


def gs_memory(doc: dict) -> dict:
    """model name -> its memory cases that ran, by height."""
    out: dict = {}
    for r in doc["results"]:
        if r["suite"] == "memory" and ok(r) and r.get("peak_extra_bytes") is not None:
            out.setdefault(r["model_name"], []).append(r)
    return {name: sorted(rs, key=lambda r: r["height"]) for name, rs in out.items()}


def gs_goals(doc: dict) -> list[str]:
    grid, mem = gs_grid(doc), gs_memory(doc)
    models = list(dict.fromkeys(name for name, _ in grid))
    lines = []
    def speedup(name, a):
        return grid[(name, a)]["grid_time_s"] / grid[(name, "wavefront")]["grid_time_s"]

    for anchor, what in (("taming_crop", "taming's crop-and-recompute sampler"), ("sequential", "fastvq sequential")):
        goal = GS_GOALS[anchor]
        cells, values = [], []
        for name in models:
            if (name, "wavefront") in grid and (name, anchor) in grid:
                values.append(speedup(name, anchor))
                cells.append(f"{name} {values[-1]:.1f}×")
        # the causal crop is a stronger baseline than the goal's (taming runs the whole crop per code):
        # shown beside it, not judged
        causal = [f"{name} {speedup(name, f'{anchor}_causal'):.1f}×" for name in models
                  if (name, "wavefront") in grid and (name, f"{anchor}_causal") in grid]
        lines.append(f"- wavefront ≥ {goal:g}× {what} (time to the grid): " + (", ".join(cells) or "–")
                     + f" ({verdict(values, lambda v: v >= goal)})"
                     + (f"; against the same crops run causally (only the codes before the one drawn, a stronger "
                        f"baseline than taming's own): {', '.join(causal)}" if causal else ""))
    cells, values = [], []
    for name, rs in mem.items():
        if len(rs) > 1:
            # the sampled codes themselves (int64, batch x height x width) grow with the height: the
            # working memory is the peak without them
            work = [r["peak_extra_bytes"] - r.get("codes_bytes", 0) for r in (rs[0], rs[-1])]
            x = work[1] / max(work[0], 1)
            values.append(x)
            cells.append(f"{name} {rs[0]['height']}→{rs[-1]['height']} rows: {fmt_bytes(rs[0]['peak_extra_bytes'])}"
                         f" → {fmt_bytes(rs[-1]['peak_extra_bytes'])}, of which the codes {fmt_bytes(rs[-1].get('codes_bytes', 0))}; "
                         f"without them {fmt_bytes(work[0])} → {fmt_bytes(work[1])} ({x:.2f}×)")
    lines.append(f"- wavefront memory flat as the height grows (≤ {GS_GOALS['memory_flat']:g}× from the shortest "
                 "grid to the tallest, the output codes aside): " + ("; ".join(cells) or "–")
                 + f" ({verdict(values, lambda v: v <= GS_GOALS['memory_flat'])})")
    return lines


def gs_markdown(path: Path, doc: dict, png: Path | None) -> str:
    m = doc["method"]
    grid, mem = gs_grid(doc), gs_memory(doc)
    parts = header(path, doc) + ["", f"{m['models']}; {m['grid']}. {m['crop']}. Extrapolation: {m['extrapolation']} "
                                     "(marked in the table). Speedup = the sampler's grid time / the wavefront's; "
                                     "mem = peak extra memory of one call. " + columns(doc)]
    if png is not None:
        parts += ["", f"![grid sampling benchmark]({rel(png)})"]
    parts += ["", "| model | sampler | codes timed | time to the grid | tokens/s | wavefront speedup | mem |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for (name, impl), r in grid.items():
        timed = str(r["tokens_timed"])
        if r.get("extrapolated"):
            timed += f" ({r['rows_timed']} of {r['height']} rows; ×{r['height'] * r['width'] / r['tokens_timed']:g})"
        wave = grid.get((name, "wavefront"))
        speed = ratio(r["grid_time_s"], wave["grid_time_s"]) if wave and impl != "wavefront" else "–"
        parts.append(f"| {name} ({r['parameters'] / 1e6:.3g}M) | {SHORT[impl]} | {timed} | {fmt_time(r['grid_time_s'])} "
                     f"| {r['tokens_per_s']:.1f} | {speed} | {fmt_mem(r)} |")
    for name in dict.fromkeys(n for n, _ in grid):
        pair = [grid.get((name, i)) for i in ("wavefront", "sequential")]
        if all(pair):
            same = pair[0]["first_rows_sha1"] == pair[1]["first_rows_sha1"]
            parts += ["", f"{name}: same codes from the wavefront and one token a step (first "
                          f"{pair[0]['compare_rows']} rows, hashed): {'yes' if same else 'NO'}."]
        causal = grid.get((name, "taming_crop_causal"))
        if causal and "mean_context_grid" in causal:
            parts += ["", f"{name}: taming crop (causal) runs {causal['mean_context_timed']:.0f} tokens a code on the "
                          f"rows timed, {causal['mean_context_grid']:.0f} on average over the whole grid."]
    if mem:
        parts += ["", f"Wavefront memory against the grid's height ({m['memory']}):", "",
                  "| model | height (rows of codes) | peak extra memory | tokens/s (one call) |", "|---|---:|---:|---:|"]
        parts += [f"| {name} | {r['height']} | {fmt_mem(r)} | {r['tokens_per_s']:.0f} |" for name, rs in mem.items()
                  for r in rs]
    notes = [f"Not measured: {SHORT.get(r['impl'], r['impl'])} ({r['model_name']}, {r['grid']}): "
             f"{r.get('skipped') or 'error: ' + str(r.get('error'))}" for r in doc["results"] if not ok(r)]
    parts += ([""] + ["  \n".join(notes)] if notes else []) + ["", "Goals:", ""] + gs_goals(doc)
    return "\n".join(parts)


def gs_plot(doc: dict, out: Path) -> Path | None:
    plt = matplotlib_pyplot()
    grid, mem = gs_grid(doc), gs_memory(doc)
    if plt is None or not (grid or mem):
        return None
    fig, (ax, axm) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    models = list(dict.fromkeys(n for n, _ in grid))
    impls = [i for i in doc["labels"] if any(k == i for _, k in grid)]
    width = 0.8 / max(1, len(impls))
    for k, impl in enumerate(impls):
        xs = [g + k * width for g, name in enumerate(models) if (name, impl) in grid]
        ax.bar(xs, [grid[(n, impl)]["grid_time_s"] for n in models if (n, impl) in grid], width,
               label=SHORT[impl] + (" (extrapolated)" if impl != "wavefront" else ""), color=COLORS.get(impl))
    ax.set_xticks([g + width * (len(impls) - 1) / 2 for g in range(len(models))], models)
    ax.set_yscale("log")
    ax.set_ylabel("seconds to the grid (lower is better)")
    ax.set_title(f"time to sample a {doc['sizes']['grid']}×{doc['sizes']['grid']} code grid, batch 1", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7)
    for name, rs in mem.items():
        axm.plot([r["height"] for r in rs], [r["peak_extra_bytes"] / MIB for r in rs], marker="o", label=name)
    if mem:
        log2_axis(axm, sorted({r["height"] for rs in mem.values() for r in rs}), "grid height (rows of codes)")
        axm.set_ylim(bottom=0)
        axm.legend(fontsize=7)
    axm.set_ylabel("peak extra memory (MiB)")
    axm.set_title(f"wavefront memory vs height, width {doc['sizes']['memory_width']}", fontsize=10)
    axm.grid(True, alpha=0.3)
    return save(fig, plt, out, plot_title("grid sampling", doc))


# ----------------------------------------------------------------------------- a busy machine

UL_GOALS = {"slowdown": 3.0, "retained": 0.8, "ratio": 1.0}
UL_PAIRS = {"sampling": ("fastvq_sampling", "taming_sampling"), "window_attention": ("fastvq_window", "sdpa_mask_window"),
            "vqgan_step": ("fastvq_vqgan", "taming_vqgan")}
# fastvq with FairThreads (opt-in: the trainers' --fair-threads) against the same anchor runs
UL_FAIR = {"window_attention": "fastvq_window_fair", "vqgan_step": "fastvq_vqgan_fair"}


def ul_variants(doc: dict) -> list[tuple[str, str, str, str]]:
    """(row label, suite, fastvq impl, anchor impl): each suite as fastvq runs by default, then with
    FairThreads where the file measured it."""
    impls = {r["impl"] for r in doc["results"]}
    out = [(suite.replace("_", " "), suite, mine, anchor) for suite, (mine, anchor) in UL_PAIRS.items()]
    out += [(f"{suite.replace('_', ' ')}, FairThreads", suite, fair, UL_PAIRS[suite][1])
            for suite, fair in UL_FAIR.items() if fair in impls]
    return out


def ul_times(doc: dict) -> dict:
    """(suite, impl, busy) -> median seconds."""
    return {(r["suite"], r["impl"], r["busy"]): r["median_s"] for r in doc["results"] if ok(r)}


def ul_rows(doc: dict) -> list[dict]:
    """One row per (suite, busy): both times, slow-downs against the quiet run, the ratio and its share kept."""
    t, rows = ul_times(doc), []
    for label, suite, mine, anchor in ul_variants(doc):
        q_mine, q_anchor = t.get((suite, mine, 0)), t.get((suite, anchor, 0))
        for busy in sorted({b for s, _, b in t if s == suite}):
            a, b = t.get((suite, mine, busy)), t.get((suite, anchor, busy))
            r = b / a if a and b else None
            q = q_anchor / q_mine if q_mine and q_anchor else None
            rows.append({"suite": label, "fair": mine in UL_FAIR.values(), "busy": busy, "mine": a, "anchor": b,
                         "slow_mine": a / q_mine if a and q_mine else None,
                         "slow_anchor": b / q_anchor if b and q_anchor else None,
                         "ratio": r, "retained": r / q if r and q else None})
    return rows


def ul_goals(rows: list[dict]) -> list[str]:
    """The goals for fastvq as it runs by default, then (where measured) with FairThreads in place of
    its default rows."""
    default = [r for r in rows if not r["fair"]]
    lines = _ul_goal_lines(default)
    fair = {r["suite"].split(",")[0]: r for r in rows if r["fair"]}
    if fair:
        with_fair = [r for r in default if r["suite"] not in {s for s in fair}] + [r for r in rows if r["fair"]]
        lines += ["", "With FairThreads (fastvq.FairThreads, the trainers' --fair-threads) in the suites that have "
                      "it, the other suites as above:", ""] + _ul_goal_lines(with_fair)
    return lines


def _ul_goal_lines(rows: list[dict]) -> list[str]:
    busiest = max((r["busy"] for r in rows), default=0)
    top = [r for r in rows if r["busy"] == busiest and busiest > 0]
    slow = [r["slow_mine"] for r in top if r["slow_mine"]]
    kept = [r["retained"] for r in top if r["retained"]]
    ratios = [r["ratio"] for r in rows if r["ratio"]]
    cell = lambda key, fmt: ", ".join(f"{r['suite']} {fmt(r[key])}" for r in top if r[key])  # noqa: E731
    return [f"- beside {busiest} busy processes, fastvq's slow-down ≤ {UL_GOALS['slowdown']:g}× its quiet time: "
            + (cell("slow_mine", lambda v: f"{v:.2f}×") or "–")
            + f" ({verdict(slow, lambda v: v <= UL_GOALS['slowdown'])})",
            f"- its ratio to the anchor ≥ {UL_GOALS['retained']:.0%} of the quiet ratio: "
            + (cell("retained", lambda v: f"{v:.0%}") or "–") + f" ({verdict(kept, lambda v: v >= UL_GOALS['retained'])})",
            f"- never below {UL_GOALS['ratio']:g}× the anchor at any load: lowest "
            + (f"{min(ratios):.2f}×" if ratios else "–") + f" ({verdict(ratios, lambda v: v >= UL_GOALS['ratio'])})"]


def ul_markdown(path: Path, doc: dict, png: Path | None) -> str:
    m = doc["method"]
    rows = ul_rows(doc)
    modes = sorted({r.get("parallel") or "?" for r in doc["results"] if ok(r)})
    how = {"pool": "fastvq's pool for small regions (the default)", "openmp": "OpenMP for every region (FASTVQ_PARALLEL=openmp)"}
    parts = header(path, doc) + ["", "**Parallel regions: " + ", ".join(how.get(x, x) for x in modes) + ".** "
                                 f"Each case quiet and beside N busy processes ({m['busy']}); {m['timing']}; "
                                     f"{m['threads']}. Pairs: " + "; ".join(
        f"{s.replace('_', ' ')}: {doc['labels'][a]} against {doc['labels'][b]}" for s, (a, b) in UL_PAIRS.items()) + "."]
    if png is not None:
        parts += ["", f"![under load benchmark]({rel(png)})"]
    parts += ["", "| case | busy processes | fastvq | anchor | fastvq slow-down | anchor slow-down | "
                  "fastvq / anchor | share of the quiet ratio |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    x = lambda v: f"{v:.2f}×" if v else "–"  # noqa: E731
    for r in rows:
        parts.append(f"| {r['suite']} | {r['busy']} | {fmt_time(r['mine'])} | {fmt_time(r['anchor'])} | "
                     f"{x(r['slow_mine'])} | {x(r['slow_anchor'])} | {x(r['ratio'])} | "
                     + (f"{r['retained']:.0%}" if r["retained"] else "–") + " |")
    parts += ["", "Goals (issue H §3):", *ul_goals(rows)]
    return "\n".join(parts)


def ul_plot(doc: dict, out: Path) -> Path | None:
    plt = matplotlib_pyplot()
    rows = ul_rows(doc)
    if plt is None or not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for suite in dict.fromkeys(r["suite"] for r in rows):
        rs = [r for r in rows if r["suite"] == suite and r["slow_mine"]]
        if rs:
            line = ax.plot([r["busy"] for r in rs], [r["slow_mine"] for r in rs], "o-", label=f"fastvq {suite}")[0]
            ax.plot([r["busy"] for r in rs], [r["slow_anchor"] or float("nan") for r in rs], "x--",
                    color=line.get_color(), label=f"anchor {suite}")
    ax.axhline(UL_GOALS["slowdown"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("busy-loop processes beside the case")
    ax.set_ylabel("time / quiet time")
    ax.set_xticks(sorted({r["busy"] for r in rows}))
    ax.legend(fontsize=7)
    return save(fig, plt, out, plot_title("slow-down on a busy machine", doc))


# ----------------------------------------------------------------------------- README

WRITERS = {"quantize": (q_plot, q_markdown), "window_attention": (wa_plot, wa_markdown),
           "raster_window": (rw_plot, rw_markdown), "sampling": (sp_plot, sp_markdown),
           "decode_linear": (dl_plot, dl_markdown), "grid_sampling": (gs_plot, gs_markdown),
           "under_load": (ul_plot, ul_markdown)}


def markers(kind: str) -> tuple[str, str]:
    return f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"


def update_readme(readme: Path, text: str, kind: str) -> bool:
    """Replace what lies between the kind's markers; False when the file or the markers are missing."""
    if not readme.exists():
        return False
    start, end = markers(kind)
    body = readme.read_text()
    i, j = body.find(start), body.find(end)
    if i < 0 or j < i:
        return False
    readme.write_text(body[:i + len(start)] + "\n" + text + "\n" + body[j:])
    return True


def compare_scripts() -> list[Path]:
    return sorted(Path(__file__).resolve().parent.glob("compare_*.py"))


def print_expected() -> int:
    """What `make compare` is about to run, how long each part should take, and how quiet the machine is."""
    total = cap = 0.0
    print("make compare: every benchmarks/compare_<op>.py on the CPU (one process per case), then report.py")
    for script in compare_scripts():
        c = importlib.import_module(script.stem).COMPARISON
        total += c.expected_s
        cap += c.budget_s["cpu"]
        last = ""
        try:
            prev = json.loads((RESULTS_DIR / f"{c.name}_cpu.json").read_text())
            m = prev["machine"]
            last = (f"; last run {prev['elapsed_s'] / 60:.1f} min at commit {short_commit(m)}, load "
                    f"{m['load_average_1_5_15min_at_start'][0]:.2f}") if "elapsed_s" in prev else ""
        except (OSError, json.JSONDecodeError, KeyError):
            pass
        print(f"  {script.name:<32} about {c.expected_s / 60:4.1f} min (budget {c.budget_s['cpu'] / 60:.0f} min{last})")
    head = (git("rev-parse", "--short", "HEAD") or "").strip()
    dirty = (git("status", "--porcelain", "--", "csrc", "fastvq", "kernels") or "").strip()
    print(f"expected duration: about {total / 60:.0f} min on a quiet 2-core CPU (no script starts a case past its "
          f"budget: {cap / 60:.0f} min in all at most, plus the case under way)")
    print(f"commit {head}" + (f", with uncommitted changes in csrc/ fastvq/ kernels/: the JSON records them"
                              if dirty else ", clean"))
    load = load_average()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
          + ("  <- not quiet: other work shares the cores and the figures will show it" if load[0] > 0.5 else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="*", type=Path, help="result files (default benchmarks/results/*.json)")
    p.add_argument("--readme", type=Path, default=REPO / "README.md", help="README to update (default README.md)")
    p.add_argument("--print", action="store_true", help="print the tables instead of writing the README")
    p.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    p.add_argument("--expected", action="store_true", help="print what `make compare` runs and its expected duration")
    args = p.parse_args(argv)
    if args.expected:
        return print_expected()

    paths = args.files or sorted(RESULTS_DIR.glob("*.json"))
    docs = load(paths)
    if not docs:
        p.error(f"no comparison results in {', '.join(map(str, paths)) or RESULTS_DIR}; run benchmarks/compare_<op>.py "
                "(or make compare) first")
    commits = {short_commit(doc["machine"]) for _, doc in docs if device_of(doc) == "cpu" and not scratch(doc)}
    if len(commits) > 1:
        print(f"note: the CPU results come from different commits ({', '.join(sorted(map(str, commits)))}); "
              "`make compare` regenerates them all from one")
    if args.no_plot or matplotlib_pyplot() is None:
        print("no plots" + ("" if args.no_plot else " (matplotlib is not installed)"))
    for kind in KINDS:
        kind_docs = sorted(((path, doc) for path, doc in docs if doc["benchmark"] == kind),
                           key=lambda pd: (device_of(pd[1]) != "cpu", str(pd[0])))
        if not kind_docs:
            continue
        draw, write = WRITERS[kind]
        sections = []
        for path, doc in kind_docs:
            png = None if args.no_plot else draw(doc, path.with_suffix(".png"))
            if png:
                print(f"wrote {png}")
            sections.append("\n".join([write(path, doc, png), *isa_comparison(doc, kind_docs)]))
        text = "\n\n".join(sections)
        start, end = markers(kind)
        quick = [str(path) for path, doc in kind_docs if scratch(doc)]
        if quick and not args.print:
            print(f"(quick and dry-run results never go into the README: {', '.join(quick)}; printing the table)\n")
        if args.print or quick or not update_readme(args.readme, text, kind):
            if not (args.print or quick):
                print(f"({args.readme} has no {start} ... {end} markers; printing the table)\n")
            print(text + "\n")
        else:
            print(f"updated {args.readme} ({kind})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
