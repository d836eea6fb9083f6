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


def save(fig, name: str, cfg: WorkbookConfig) -> Path:
    """Save to static/<preset>/<name>.png (static/full is what the README shows)."""
    path = repo_root() / "static" / cfg.name / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
