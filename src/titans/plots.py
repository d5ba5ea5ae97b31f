"""PNG plots of a run: loss curves, loss by position, the needle-in-a-haystack grid, accuracy versus context length,
the memory's test-time learning (`titans inspect`) and forecasts against the truth. The only module that draws.

Figures are drawn with matplotlib's object API on an Agg canvas: no display is needed and the
global pyplot backend is left alone. Each function saves the figure and returns it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_accuracy_vs_length", "plot_forecasts", "plot_heatmap_panels", "plot_inspection", "plot_lines",
           "plot_loss_by_position", "plot_loss_curves", "plot_needle_heatmap"]


def _save(fig: Figure, path: str | Path) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_loss_curves(metrics: Sequence[Mapping], path: str | Path, keys: Sequence[str] | None = None) -> Figure:
    """One line per metric key against ``step``; by default every key whose name ends in "loss"
    (e.g. ``train/loss``, ``eval/loss``). Records without a key are skipped for that line."""
    if keys is None:
        keys = list(dict.fromkeys(k for r in metrics for k in r if k.endswith("loss")))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for key in keys:
        points = [(r["step"], r[key]) for r in metrics
                  if isinstance(r.get(key), numbers.Real) and "step" in r]
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, label=key, marker="o" if len(points) < 20 else None)
    if not ax.lines:
        raise ValueError(f"no values to plot for keys {list(keys)}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_needle_heatmap(
    accuracy: Sequence[Sequence[float]] | np.ndarray,
    lengths: Sequence[int],
    depths: Sequence[float],
    path: str | Path,
    title: str = "Needle in a haystack",
) -> Figure:
    """Accuracy grid with context lengths as rows and needle depths as columns (values in [0, 1])."""
    grid = np.asarray(accuracy, dtype=float)
    if grid.shape != (len(lengths), len(depths)):
        raise ValueError(f"accuracy has shape {grid.shape}, expected (len(lengths), len(depths)) = "
                         f"({len(lengths)}, {len(depths)})")
    fig = Figure(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.6 * len(lengths)))
    ax = fig.add_subplot()
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, path)


def plot_accuracy_vs_length(results: Mapping[str, Mapping[int, float]], path: str | Path,
                            title: str = "Accuracy versus context length") -> Figure:
    """One line per model name: accuracy at each context length (log-2 length axis)."""
    if not results:
        raise ValueError("no results to plot")
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for name, by_length in results.items():
        lengths = sorted(by_length, key=int)
        ax.plot([int(n) for n in lengths], [by_length[n] for n in lengths], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("context length")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_loss_by_position(losses: Sequence[float], path: str | Path, title: str) -> Figure:
    """Mean loss at each position of the context window, averaged over buckets so that the curve is readable."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    losses = np.asarray(losses)
    width = max(1, len(losses) // 64)
    usable = len(losses) // width * width
    ax.plot(np.arange(usable).reshape(-1, width).mean(1), losses[:usable].reshape(-1, width).mean(1))
    ax.set_xlabel("position in the context window")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_inspection(records: Sequence, path: str | Path, title: str) -> Figure:
    """Inner loss before/after each piece, the relative weight change and the mean gates, one line per memory layer
    (``records``: :class:`titans.inspection.PieceRecord`)."""
    fig = Figure(figsize=(16, 4.2))
    loss_ax, change_ax, signal_ax = fig.subplots(1, 3)
    for layer in sorted({r.layer for r in records}):
        rows = [r for r in records if r.layer == layer]
        pieces = [r.piece for r in rows]
        line, = loss_ax.plot(pieces, [r.inner_loss_before for r in rows], marker="o", label=f"layer {layer} before")
        loss_ax.plot(pieces, [r.inner_loss_after for r in rows], marker="o", linestyle="--", color=line.get_color(),
                     label=f"layer {layer} after")
        change_ax.plot(pieces, [r.weight_change for r in rows], marker="o", label=f"layer {layer}")
        for signal, style in (("theta", "-"), ("eta", "--"), ("alpha", ":")):
            signal_ax.plot(pieces, [r.mean(signal) for r in rows], marker="o", linestyle=style,
                           color=line.get_color(), label=f"layer {layer} {signal}")
    loss_ax.set(xlabel="piece", ylabel="inner loss ||M(k) - v||^2", title="before vs after storing the piece")
    change_ax.set(xlabel="piece", ylabel="||dW|| / ||W||", title="memory weight change per piece")
    signal_ax.set(xlabel="piece", ylabel="mean over heads and tokens", title="step size, momentum, forgetting")
    for ax in (loss_ax, change_ax, signal_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_forecasts(inputs: Sequence, targets: Sequence, forecasts: Sequence, channels: Sequence[str],
                   starts: Sequence[str], path: str | Path, title: str, max_channels: int = 3) -> Figure:
    """One row per window, one column per channel (the first ``max_channels``): the look-back, the true future and
    the forecast; ``inputs`` (N, lookback, C), ``targets`` and ``forecasts`` (N, horizon, C), ``starts`` the time
    stamp of each window's first step."""
    inputs, targets, forecasts = (np.asarray(a, dtype=float) for a in (inputs, targets, forecasts))
    rows, lookback, cols = len(inputs), inputs.shape[1], min(len(channels), max_channels)
    future = np.arange(lookback, lookback + targets.shape[1])
    fig = Figure(figsize=(4.5 * cols, 2.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw={"hspace": 0.5})
    for r in range(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.plot(np.arange(lookback), inputs[r, :, c], color="0.5", lw=1, label="look-back")
            ax.plot(future, targets[r, :, c], color="black", lw=1, label="truth")
            ax.plot(future, forecasts[r, :, c], color="tab:red", lw=1.2, label="forecast")
            ax.set_title(f"{channels[c]}, from {starts[r]}", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def plot_lines(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: str | Path,
               title: str, xlabel: str | Sequence[str], ylabel: str | Sequence[str], *, logx: bool = False,
               ylim: tuple[float, float] | None = None) -> Figure:
    """Side-by-side panels (panel title -> line name -> (xs, ys)), one line per name, the same colour for a name
    in every panel (``titans reproduce``'s comparisons: loss curves, loss by position, accuracy by length)."""
    if not any(panels.values()):
        raise ValueError("no lines to plot")
    fig = Figure(figsize=(6.5 * len(panels), 4.5), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    names = list(dict.fromkeys(n for lines in panels.values() for n in lines))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    styles = {n: ("-", "--", ":", "-.")[i // 10 % 4] for i, n in enumerate(names)}
    for i, (ax, (panel, lines)) in enumerate(zip(axes, panels.items(), strict=True)):
        for name, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=name, color=colors[name], linestyle=styles[name],
                    marker="o" if len(xs) < 12 else None)
        ax.set_xlabel(xlabel if isinstance(xlabel, str) else xlabel[i])
        ax.set_ylabel(ylabel if isinstance(ylabel, str) else ylabel[i])
        if logx:
            ax.set_xscale("log", base=2)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.set_title(panel)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    fig.legend(list(handles.values()), list(handles), loc="outside right center", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_heatmap_panels(grids: Mapping[str, Mapping[str, Sequence[Sequence[float]]]], lengths: Sequence[int],
                        depths: Sequence[float], path: str | Path, title: str) -> Figure:
    """Needle grids as a table of heatmaps: one row per model, one column per task (accuracy in [0, 1], context
    lengths as rows and depths as columns of each heatmap)."""
    rows, cols = list(grids), list(dict.fromkeys(t for g in grids.values() for t in g))
    if not rows or not cols:
        raise ValueError("no grids to plot")
    fig = Figure(figsize=(1.0 + 0.7 * len(depths) * len(cols), 0.8 + 0.45 * len(lengths) * len(rows)),
                 layout="constrained")
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    image = None
    for r, model in enumerate(rows):
        for c, task in enumerate(cols):
            ax = axes[r][c]
            if task not in grids[model]:
                ax.axis("off")
                continue
            grid = np.asarray(grids[model][task], dtype=float)
            image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=6)
            ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=6)
            ax.set_yticks(range(len(lengths)), [str(n) for n in lengths], fontsize=6)
            if r == 0:
                ax.set_title(task, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"{model}\nlength", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("needle depth", fontsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, label="accuracy", shrink=0.6)
    fig.suptitle(title)
    return _save(fig, path)
