"""One plotting helper: the workbook's figure style and saving to static/<preset>/.

    fig, ax = figure(); ax.plot(...); save(fig, "02_loss", cfg)
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from medusa_lib.config import WorkbookConfig, repo_root


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.2):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), constrained_layout=True)
    for ax in (axes if ncols > 1 else [axes]):
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    return fig, axes


def figure_dir(cfg: WorkbookConfig) -> Path:
    """static/<preset>/ (static/full is what the README shows), or cfg.figures_dir when set."""
    return Path(cfg.figures_dir or repo_root() / "static" / cfg.name)


def save(fig, name: str, cfg: WorkbookConfig) -> Path:
    """Save to figure_dir(cfg)/<name>.png."""
    path = figure_dir(cfg) / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_runs(logs: dict, metric: str = "acc@1", heads=None, smooth: int = 1, with_train: bool = False):
    """Eval curves of several training runs, one panel per head: `logs` maps a run's name to its
    log.csv DataFrame (train.read_log). `with_train` adds the training loss, dashed (metric "loss"
    only: the gap between the two is overfitting). A run keeps one colour in every panel and is named
    once in the legend, also when it has fewer heads than the others. Returns the figure."""
    import pandas as pd

    evals = {name: log[log.split == "eval"] for name, log in logs.items()}
    all_heads = sorted({int(h) for ev in evals.values() for h in ev["head"].unique()})
    heads = [h for h in all_heads if heads is None or h in heads]
    fig, axes = figure(ncols=max(1, len(heads)), width=3.4)
    axes = list(axes) if len(heads) > 1 else [axes]
    palette = plt.get_cmap("tab10" if len(logs) <= 10 else "tab20").colors
    style = {name: (palette[i % len(palette)], "-" if i < len(palette) else "-.") for i, name in enumerate(logs)}
    for ax, h in zip(axes, heads):
        for name, ev in evals.items():
            color, ls = style[name]
            g = ev[ev["head"] == h]
            if len(g):
                ax.plot(g.step, pd.to_numeric(g[metric]).rolling(smooth, min_periods=1).mean(), color=color, ls=ls,
                        label=name)
            tr = logs[name][(logs[name].split == "train") & (logs[name]["head"] == h)].dropna(subset=["loss"])
            if with_train and metric == "loss" and len(tr):
                ax.plot(tr.step, tr["loss"].rolling(smooth, min_periods=1).mean(), ls="--", color=color,
                        label=f"{name} (train)")
        ax.set_title(f"head {h} (t+{h + 2})"); ax.set_xlabel("step")
    axes[0].set_ylabel("loss: eval solid, train dashed" if with_train and metric == "loss" else f"eval {metric}")
    legend = {}  # label -> line, over every panel: a run with fewer heads has no line in the last one
    for ax in axes:
        for line, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, line)
    if len(legend) <= 6:
        axes[-1].legend(legend.values(), legend.keys(), fontsize=7)
    else:  # beside the panels, not over the last one
        fig.legend(legend.values(), legend.keys(), fontsize=7, loc="outside right upper")
    return fig


def draw_tree(ax, tree, labels=None, accepted=(), rejected=()):
    """A candidate tree with the root on top and every child under its parent (x: leaves in
    depth-first order, a parent centred over its children, so no edges cross). `labels` (N,) names
    the nodes (tokens; default: their rank); `accepted` nodes are green, `rejected` ones (not the
    base's choice after their parent) red, the rest blue."""
    children = {j: [] for j in range(tree.size)}
    for j, p in enumerate(tree.paths, start=1):
        children[0 if len(p) == 1 else tree.paths.index(p[:-1]) + 1].append(j)
    x, next_leaf = {}, [0]

    def place(j):
        for c in children[j]:
            place(c)
        if children[j]:
            x[j] = sum(x[c] for c in children[j]) / len(children[j])
        else:
            x[j], next_leaf[0] = next_leaf[0], next_leaf[0] + 1

    place(0)
    for j, kids in children.items():
        for c in kids:
            ax.plot([x[j], x[c]], [-tree.positions[j], -tree.positions[c]], color="#bbb", zorder=1)
    for j in range(tree.size):
        color = "#55a868" if j in accepted else "#c44e52" if j in rejected else "#4c72b0"
        text = labels[j] if labels is not None else ("root" if j == 0 else f"r{tree.paths[j - 1][-1]}")
        ax.annotate(text, (x[j], -tree.positions[j]), ha="center", va="center", fontsize=7, zorder=3,
                    bbox=dict(boxstyle="round,pad=0.25", fc=color, ec="none", alpha=0.9), color="w")
    ax.set_xlim(-0.7, max(next_leaf[0] - 0.3, 0.7))
    ax.set_ylim(-tree.depth - 0.6, 0.6)
    ax.set_yticks([-d for d in range(tree.depth + 1)], ["root"] + [f"depth {d}" for d in range(1, tree.depth + 1)])
    ax.set_xticks([])
    ax.grid(False)
    return ax
