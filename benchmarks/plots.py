"""Figures from a results folder's CSVs (nothing is measured here); ratios are computed
from the raw columns: ``python -m benchmarks.plots DIR [DIR ...]``. ce_time.png, ce_memory.png
(with peak_rss.csv), peak_rss.png, linear_memory.png (with linear_peak.csv), linear_time.png,
timemodel.png and headline.png (a panel of each of the first three)."""

from __future__ import annotations

import csv
import json
import math
import sys
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

MIB, GIB = 2**20, 2**30
STYLE = {  # color, marker, line style
    "jaxce": ("C0", "o", "-"),
    "optax": ("C1", "s", "-."),
    "plain log_softmax": ("C2", "^", "-"),
    "torch": ("C3", "D", "-"),
    "floor": ("0.4", "", "--"),
    "lse pass": ("0.6", "", ":"),
    "jaxce fused": ("C0", "o", "-"),
    "jaxce min_work": ("C8", "*", "-"),
    "jaxce min_work 16-bit acc": ("#b8860b", "P", "-"),
    "jaxce min_memory": ("C9", "p", "-"),
    "jaxce unfused": ("C4", "v", "-"),
    "optax unfused": ("C1", "s", "-"),
    "plain unfused": ("C2", "^", "-"),
    "torch reference": ("C3", "D", "-"),
    "torch chunked": ("C5", "P", "-"),
    "tokamax xla": ("C6", "x", "-"),
    "tokamax chunked_xla": ("C7", "X", "-"),
}
plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "figure.dpi": 100})


def num(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def read(path):
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return [r for r in csv.DictReader(fh) if r.get("status") == "ok"]


def unique(rows, key):
    return list(dict.fromkeys(key(r) if callable(key) else r[key] for r in rows))


def curves(ax, rows, key, y, ls=None, lw=2.0):
    """One line per ``row[key]`` over the classes; jaxce's drawn thicker and on top."""
    for name in unique(rows, key):
        color, marker, style = STYLE.get(name.rsplit(" ", 1)[0] if ls else name, ("k", ".", "-"))
        ours = name.startswith("jaxce")  # it can coincide with optax
        pts = sorted((num(r["classes"]), y(r)) for r in rows if r[key] == name)
        style = (ls or {}).get(name.rsplit(" ", 1)[-1], style)
        kw = dict(lw=lw if ours else 1.2, zorder=3 if ours else 2, label=name)
        ax.plot(*zip(*pts, strict=True), color=color, marker=marker, ls=style, ms=4, **kw)


def class_axis(ax, ylabel, title, log=True, legend=None):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("classes")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1024:g}k"))
    ax.set_yscale("log" if log else "linear")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=legend)


def bars(ax, rows, group, key, draw, ylabel, title, legend=6):
    """Grouped bars: a group per ``group(row)``, a bar per ``row[key]``, drawn by ``draw``."""
    groups, names = unique(rows, group), unique(rows, key)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        for j, g in enumerate(groups):
            for r in (r for r in rows if r[key] == name and group(r) == g):
                x = j + (i - (len(names) - 1) / 2) * width
                draw(ax, x, width, STYLE.get(name, ("k",))[0], r, name if j == 0 else None)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=7)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(alpha=0.3, axis="y")
    if legend:
        ax.legend(fontsize=legend)


def ce_time(ax, rows, dtype, relative, title=None, legend=None):
    rows = [r for r in rows if r["dtype"] == dtype]
    floor = {r["classes"]: num(r["median_ms"]) for r in rows if r["provider"] == "floor"}
    scale = (lambda r: floor.get(r["classes"], math.nan)) if relative else lambda r: 1
    curves(ax, rows, "provider", lambda r: num(r["median_ms"]) / scale(r))
    if relative:
        title = title or f"{dtype}: time relative to the floor"
        class_axis(ax, "time / memory-traffic floor", title, log=False, legend=legend)
        return ax.set_ylim(bottom=0)
    class_axis(ax, "ms (median)", f"{dtype}: time", legend=legend)


def ce_memory(ax, rows, dtype, title=None, legend=None):
    rows = [r for r in rows if r["dtype"] == dtype]
    curves(ax, rows, "variant", lambda r: num(r["temp_bytes"]) / MIB)
    size = {(num(r["classes"]), num(r["tokens"]) * num(r["classes"])) for r in rows}
    pts = sorted((c, s * (4 if dtype == "float32" else 2) / MIB) for c, s in size)
    ax.plot(
        *zip(*pts, strict=True), color="0.5", ls="--", lw=0.8, label=f"one {dtype} logits array"
    )
    title = title or f"{dtype} [{rows[0]['tokens']}, classes]: XLA temporaries"
    class_axis(ax, "temporaries, MiB (compile-only)", title, legend=legend)


def peak(ax, rows):
    """Per (variant, dtype): the growth of the memory peak over one forward+backward."""
    rows = [
        dict(r, classes=r["shape"].split("x")[1], series=f"{r['variant']} {r['dtype']}")
        for r in rows
    ]
    curves(ax, rows, "series", lambda r: num(r["step_mib"]), {"float32": "-", "bfloat16": ":"}, 2.5)
    size = {(num(r["classes"]), num(r["shape"].split("x")[0]) * num(r["classes"])) for r in rows}
    pts = sorted((c, s * 4 / MIB) for c, s in size)
    ax.plot(
        *zip(*pts, strict=True), color="k", ls="--", lw=0.7, zorder=4, label="one f32 logits array"
    )
    title = f"one process, one forward+backward ({rows[0]['shape'].split('x')[0]} tokens)"
    class_axis(ax, "peak growth over the step, MiB", title, legend=6)


def total(r):
    """Inputs + gradients + temporaries."""
    parts = ("temp_bytes", "argument_bytes", "output_bytes")
    return sum(num(r[k]) for k in parts)


def linear_memory(ax, rows, dtype, title=None, legend=None):
    rows = [r for r in rows if r["dtype"] == dtype]
    fused = {r["shape_name"]: total(r) for r in rows if r["variant"] == "jaxce fused"}

    def draw(ax, x, w, color, r, name):
        ax.bar([x], [total(r) / GIB], w, color=color, alpha=0.45, label=name and f"{name}: total")
        temps = num(r["temp_bytes"]) / GIB
        ax.bar([x], [temps], w, color=color, label=name and f"{name}: temporaries")
        if r["variant"] != "jaxce fused":
            label = f"{total(r) / fused[r['shape_name']]:.1f}×"
            ax.annotate(label, (x, total(r) / GIB), ha="center", va="bottom", fontsize=7)

    title = title or f"{dtype}: inputs + gradients + temporaries (labels: ÷ fused)"
    group = lambda r: f"{r['shape_name']}\n{r['tokens']}×{r['hidden']}×{r['vocab']}"  # noqa: E731
    bars(ax, rows, group, "variant", draw, "GiB (compile-only)", title, legend)


def bar(column, annotate, ax, x, w, color, r, name):
    ax.bar([x], [num(r[column])], w, color=color, label=name)
    if annotate:
        ax.annotate(
            f"{num(r[column]):,.0f}", (x, num(r[column])), ha="center", va="bottom", fontsize=6
        )


def linear_peak(ax, rows):
    group = lambda r: f"{r['shape'].replace('x', '×')}\n{r['dtype']}"  # noqa: E731
    title = "measured: one process, one forward+backward"
    bars(
        ax,
        rows,
        group,
        "variant",
        partial(bar, "step_mib", True),
        "peak growth over the step, MiB",
        title,
    )


def shape(r):
    return f"{r['tokens']}×{r['hidden']}×{r['vocab']}\n{r['dtype']}"


def linear_time(ax, rows, label):
    title = f"fused linear cross-entropy forward+backward time, {label}"
    bars(ax, rows, shape, "provider", partial(bar, "median_ms", False), "ms (median)", title)


def timemodel(ax, rows, shape_):
    rows = [r for r in rows if r["shape"] == shape_]
    title = f"modelled value_and_grad time, {shape_.replace('x', '×')} {rows[0]['dtype']}"
    bars(ax, rows, lambda r: r["chip"], "variant", partial(bar, "model_ms", True), "ms", title)


def figure(path, panels, title, width=4.6, height=3.6, rows=1, widths=None):
    """A figure of ``panels`` (functions of one axes); no title above them if None."""
    widths = widths or [width] * math.ceil(len(panels) / rows)
    size = (sum(widths), height * rows)
    fig, axes = plt.subplots(rows, len(widths), figsize=size, squeeze=False, width_ratios=widths)
    for ax, panel in zip(axes.flat, panels, strict=False):
        panel(ax)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw(out):
    """Draws every figure whose CSVs are in the folder ``out``."""
    out = Path(out)
    meta = json.loads((out / "meta.json").read_text()) if (out / "meta.json").exists() else {}
    label = meta.get("label", out.name)
    ce, mem, lin = read(out / "ce_time.csv"), read(out / "ce_memory.csv"), read(out / "linear.csv")
    peaks, lin_t = read(out / "peak_rss.csv"), read(out / "linear_time.csv")
    lin_p = read(out / "linear_peak.csv")
    head = []
    if ce:
        dts, tokens = unique(ce, "dtype"), ce[0]["tokens"]
        panels = [partial(ce_time, rows=ce, dtype=d, relative=True) for d in dts]
        panels[0].keywords["legend"] = 7
        panels += [partial(ce_time, rows=ce, dtype=d, relative=False) for d in dts]
        title = f"cross-entropy jit(value_and_grad), {tokens} tokens, {label}"
        figure(out / "ce_time.png", panels, title, height=3.2, rows=2)
        title = f"CE fwd+bwd time ÷ floor, float32, {tokens} tokens"
        head.append(partial(ce_time, rows=ce, dtype="float32", relative=True, title=title))
        head[-1].keywords["legend"] = 7
    if mem:
        panels = [partial(ce_memory, rows=mem, dtype=d) for d in unique(mem, "dtype")]
        panels[0].keywords["legend"] = 7
        panels += [partial(peak, rows=peaks)] if peaks else []
        figure(out / "ce_memory.png", panels, f"cross-entropy value_and_grad memory, {label}")
        d = "bfloat16" if "bfloat16" in unique(mem, "dtype") else "float32"
        title = f"CE temporaries, {d}, {mem[0]['tokens']} tokens"
        head.append(partial(ce_memory, rows=mem, dtype=d, title=title, legend=7))
    if peaks:
        title = f"cross-entropy peak memory, {label}"
        figure(out / "peak_rss.png", [partial(peak, rows=peaks)], title, width=5.2, height=3.8)
    if lin or lin_p:
        panels = [partial(linear_memory, rows=lin, dtype=d, legend=6) for d in unique(lin, "dtype")]
        for panel in panels[1:]:
            panel.keywords["legend"] = None
        widths = [5.4] * len(panels) + ([3.6] if lin_p else [])
        panels += [partial(linear_peak, rows=lin_p)] if lin_p else []
        title = f"fused linear cross-entropy value_and_grad wrt (hidden, kernel), {label}"
        figure(out / "linear_memory.png", panels, title, height=3.9, widths=widths)
    if lin:
        d = "bfloat16" if "bfloat16" in unique(lin, "dtype") else "float32"
        title = f"fused linear CE memory, {d} (÷ fused)"
        head.append(partial(linear_memory, rows=lin, dtype=d, title=title, legend=6))
    if lin_t:
        width = 1.6 + 2.2 * len(unique(lin_t, shape))
        panel = partial(linear_time, rows=lin_t, label=label)
        figure(out / "linear_time.png", [panel], None, width=width, height=3.4)
    if tm := read(out / "timemodel.csv"):
        panels = [partial(timemodel, rows=tm, shape_=s) for s in unique(tm, "shape")]
        title = "roofline model from compile-only HLO (benchmarks/timemodel.py), calibrated"
        figure(out / "timemodel.png", panels, title, width=5.6, height=3.6)
    if head:
        title = f"jaxce vs optax vs PyTorch — {label}"
        figure(out / "headline.png", head, title, width=4.8, height=3.8)


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        draw(folder)
        print("drew", folder)
