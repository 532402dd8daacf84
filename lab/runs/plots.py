"""The lab's plots of run records (PNG): loss curves, throughput, learning rate against the objective, quality per
domain, and quality against speed and memory per arch x quantized variant. Used by lab.compare and lab.study.report.

Every plot takes the records it draws and the file to write, and returns that path, or None when the records
hold nothing to draw (then no file is written). One colour per arch (or run), the same in every plot.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from lab import LabError
from lab.runs.records import VAL_DOMAIN, RunData, as_number, by_arch, finite_mean, sources_of, variants_of
from lab.runs.tables import Row


def group_colors(groups: Iterable[str]) -> dict[str, Any]:
    """One colour per arch (or run), the same in every plot."""
    import matplotlib.pyplot as plt

    return {g: plt.cm.tab10(i % 10) for i, g in enumerate(sorted(groups))}


def save_figure(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)  # pyplot keeps every open figure alive otherwise
    return path


# -- loss curves ----------------------------------------------------------------------------------------------------


def _tokens_at(item: RunData, steps: Sequence[int]) -> list[float] | None:
    """Tokens seen at each optimizer step: steps x tokens per step when the run logged it (exact),
    else read off the step-aligned `tokens_seen` history (which is only logged every few steps)."""
    import numpy as np

    per_step = as_number(item.run.data.params.get("train/tokens_per_step"))
    if per_step:
        return [step * per_step for step in steps]
    tokens = item.history.get("tokens_seen")
    if not tokens:
        return None
    xs, ys = zip(*tokens)
    return list(np.interp(steps, xs, ys))


def _stage_starts(item: RunData, use_tokens: bool) -> list[float]:
    """Where the `stage` index steps up, in tokens (or steps)."""
    points = item.history.get("stage", [])
    steps = [step for (step, value), (_, before) in zip(points[1:], points) if value > before]
    if not steps:
        return []
    return (_tokens_at(item, steps) or steps) if use_tokens else steps


def plot_val_loss(data: Sequence[RunData], by: str, path: Path) -> Path | None:
    """Validation loss (overall, then per domain) against tokens seen, one panel per metric, stage changes dashed."""
    import matplotlib.pyplot as plt

    keys = ["val/loss", *sorted({k for d in data for k in d.history if VAL_DOMAIN.match(k) and k.endswith("/loss")})]
    keys = [k for k in keys if any(d.history.get(k) for d in data)]
    if not keys:
        return None
    several_archs = len({d.arch for d in data}) > 1

    def group_of(item: RunData) -> str:
        if by == "curriculum":
            return f"{item.curriculum} · {item.arch}" if several_archs else item.curriculum
        return item.arch if by == "arch" else item.name

    colors = group_colors({group_of(d) for d in data})
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    use_tokens = all(_tokens_at(d, [0]) is not None for d in data)
    # curriculum stage changes of every run (one line where budgets match); per curriculum in its colour
    boundaries = sorted({(x, group_of(item) if by == "curriculum" else "") for item in data
                         for x in _stage_starts(item, use_tokens)})
    for ax, key in zip(axes[0], keys):
        for x, group in boundaries:
            ax.axvline(x, color=colors[group] if group else "grey", ls="--", lw=0.8, alpha=0.7 if group else 1.0)
        _draw_curves(ax, key, data, [group_of(d) for d in data], colors, use_tokens)
    return save_figure(fig, path)


def _draw_curves(ax: Any, key: str, data: Sequence[RunData], groups: Sequence[str], colors: dict[str, Any],
                 use_tokens: bool) -> None:
    """One panel: each run's `key` history in its group's colour, one legend entry per group, sorted."""
    from matplotlib.ticker import EngFormatter

    labelled = set()
    for item, group in zip(data, groups):
        points = item.history.get(key)
        if not points:
            continue
        steps, values = zip(*points)
        xs = _tokens_at(item, steps) if use_tokens else list(steps)
        ax.plot(xs, values, color=colors[group], alpha=0.85, lw=1.4, marker="o", ms=2.5,
                label=None if group in labelled else group)
        labelled.add(group)
    ax.set_title(key)
    ax.set_xlabel("tokens seen" if use_tokens else "optimizer step")
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=labels.__getitem__)
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=8)


# -- speed ------------------------------------------------------------------------------------------------------------


def plot_throughput(rows: Sequence[Row], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.mean.get("tokens_per_s") is not None]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) + 2), 4.2))
    means = [r.mean["tokens_per_s"] for r in rows]
    errors = [r.std.get("tokens_per_s") or 0.0 for r in rows]
    colors = group_colors({r.arch for r in rows})
    bars = ax.bar([r.label for r in rows], means, yerr=errors if any(errors) else None, capsize=4,
                  color=[colors[r.arch] for r in rows])
    for bar, row in zip(bars, rows):
        mfu = row.mean.get("mfu")
        if mfu is not None:
            ax.annotate(f"MFU {100 * mfu:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8, xytext=(0, 3), textcoords="offset points")
    ax.set_ylabel("training tokens/s (median over windows)")
    ax.set_title("throughput")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


# -- learning rate ----------------------------------------------------------------------------------------------------


@dataclass
class LrPoint:
    lr: float
    objective: float
    group: str
    pruned: bool


def lr_points_from_runs(data: Sequence[RunData]) -> list[LrPoint]:
    return [LrPoint(d.values["lr"], d.values["objective"], d.arch, d.values.get("pruned_at_step") is not None)
            for d in data if d.values.get("lr") is not None and d.values.get("objective") is not None]


def lr_points_from_study(storage: str, study_name: str, param: str = "optim.lr") -> list[LrPoint]:
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        raise LabError(f"no Optuna study {study_name!r} in {storage}") from None
    points = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if param in trial.params and trial.value is not None and math.isfinite(trial.value):
            points.append(LrPoint(trial.params[param], trial.value, study_name, "pruned_at_step" in trial.user_attrs))
    return points


def plot_lr(points: Sequence[LrPoint], objective: str, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if len({p.lr for p in points}) < 2:
        return None  # one learning rate: nothing to plot against
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = group_colors({p.group for p in points})
    for group, color in colors.items():
        mine = sorted((p for p in points if p.group == group), key=lambda p: p.lr)
        ax.plot([p.lr for p in mine], [p.objective for p in mine], color=color, alpha=0.4, lw=1)
        for pruned in (False, True):
            sel = [p for p in mine if p.pruned == pruned]
            if sel:
                ax.scatter([p.lr for p in sel], [p.objective for p in sel], color=color if not pruned else "none",
                           edgecolors=color, s=40, label=f"{group}{' (pruned)' if pruned else ''}")
        best = min(mine, key=lambda p: p.objective)
        ax.annotate(f"{best.lr:.2g}", (best.lr, best.objective), xytext=(0, -14), textcoords="offset points",
                    ha="center", fontsize=8, color=color)
    ax.set_xscale("log")
    ax.margins(y=0.15)  # room for the best-lr labels
    ax.set_xlabel("peak learning rate (optim.lr)")
    ax.set_ylabel(f"{objective} (final, or at pruning)")
    ax.set_title("learning rate vs objective")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# -- quality per domain, and against speed and memory ------------------------------------------------------------------


def plot_bpb_per_domain(data: Sequence[RunData], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    sources, groups = sources_of(data), by_arch(data)
    if not sources:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(sources) * len(groups) / 3 + 2), 4.2))
    colors = group_colors(groups)
    width = 0.8 / len(groups)
    for index, (arch, items) in enumerate(groups.items()):
        means = [finite_mean([i.values.get(f"val/{s}/bpb") for i in items]) or 0.0 for s in sources]
        spread = [statistics.stdev(v) if len(v := [i.values[f"val/{s}/bpb"] for i in items
                                                  if i.values.get(f"val/{s}/bpb") is not None]) > 1 else 0.0
                  for s in sources]
        ax.bar([x + index * width for x in range(len(sources))], means, width, yerr=spread if any(spread) else None,
               capsize=3, color=colors[arch], label=arch)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(sources))], sources)
    ax.set_ylabel("bits per byte (final, lower is better)")
    ax.set_title("quality per domain")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_quality_speed_memory(data: Sequence[RunData], path: Path) -> Path | None:
    """One point per arch x variant: bits-per-byte (mean over sources) against decode speed, sized by weight memory."""
    import matplotlib.pyplot as plt

    points = []
    for arch, items in by_arch(data).items():
        for variant in variants_of(items):
            prefix = f"quant/{variant}/"
            bpb = finite_mean([finite_mean([v for k, v in i.values.items()
                                            if k.startswith(prefix + "val/") and k.endswith("/bpb")]) for i in items])
            speed = finite_mean([i.values.get(prefix + "decode_tok_s_bs1") for i in items])
            memory = finite_mean([i.values.get(prefix + "weights_mb") for i in items])
            if bpb is not None and (speed is not None or memory is not None):
                points.append((arch, variant, bpb, speed, memory))
    if not points:
        return None
    use_speed = all(p[3] is not None for p in points)
    colors = group_colors({p[0] for p in points})
    markers = dict(zip(sorted({p[1] for p in points}), "osD^v<>PX*"))
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    largest = max((p[4] or 0.0) for p in points) or 1.0
    for arch, variant, bpb, speed, memory in points:
        ax.scatter(speed if use_speed else memory, bpb, s=40 + 260 * (memory or 0.0) / largest, color=colors[arch],
                   marker=markers[variant], alpha=0.8, edgecolors="black", linewidths=0.5)
        ax.annotate(f"{arch} {variant}", (speed if use_speed else memory, bpb), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    # weights_mb is in MB (lab.config.units.MB, 10^6 bytes)
    ax.set_xlabel("decode tokens/s, batch 1 (marker area: weight memory)" if use_speed else "weight memory (MB)")
    ax.set_ylabel("bits per byte, mean over sources")
    ax.set_title("quality vs speed vs memory")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
