"""PNG plots of benchmark results (matplotlib, headless). Each function returns the file written, or
``None`` when matplotlib is missing or there is nothing to draw."""

from __future__ import annotations

import os


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _save(fig, path: str, plt) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def tpot_vs_batch(
    series: dict[str, list[tuple[int, float | None]]], path: str, title: str = "TPOT vs batch size"
):
    """One line per series: mean time per output token (ms) against batch size, log2 x axis."""
    plt = _pyplot()
    series = {k: [(b, t) for b, t in v if t is not None] for k, v in series.items()}
    series = {k: v for k, v in series.items() if v}
    if plt is None or not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([b for b, _ in points], [t * 1000 for _, t in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    sizes = sorted({b for points in series.values() for b, _ in points})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size")
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, plt)


def bars(values: dict[str, float | None], path: str, ylabel: str, title: str, fmt: str = "{:.1f}"):
    """A labelled bar per entry (``None`` entries are skipped)."""
    plt = _pyplot()
    values = {k: v for k, v in values.items() if v is not None}
    if plt is None or not values:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(values) + 2), 4.5))
    names = list(values)
    heights = [values[n] for n in names]
    rects = ax.bar(range(len(names)), heights, color="tab:blue")
    ax.set_ylim(0, max(heights) * 1.12)
    for rect, h in zip(rects, heights):
        ax.annotate(
            fmt.format(h),
            (rect.get_x() + rect.get_width() / 2, h),
            ha="center",
            va="bottom",
            fontsize="small",
        )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path, plt)


def stacked_bars(stages: dict[str, dict[str, float | None]], path: str, ylabel: str, title: str):
    """Bars split into stacked segments: ``{bar: {segment: seconds}}`` (missing segments count 0)."""
    plt = _pyplot()
    stages = {k: v for k, v in stages.items() if any(x for x in v.values())}
    if plt is None or not stages:
        return None
    segments: list[str] = []
    for v in stages.values():
        segments += [s for s in v if s not in segments]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(stages) + 2), 4.5))
    names = list(stages)
    bottom = [0.0] * len(names)
    for seg in segments:
        h = [stages[n].get(seg) or 0.0 for n in names]
        ax.bar(range(len(names)), h, bottom=bottom, label=seg)
        bottom = [a + b for a, b in zip(bottom, h)]
    for i, total in enumerate(bottom):
        ax.annotate(f"{total:.1f}", (i, total), ha="center", va="bottom", fontsize="small")
    ax.set_ylim(0, max(bottom) * 1.12)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path, plt)
