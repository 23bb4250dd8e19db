"""PNG plots of a search: the pairwise mask-distance heatmap and the distance curve."""

from __future__ import annotations

import os

from .persist.io import atomic_path

__all__ = ["plot_search"]


def plot_search(eb, path: str | os.PathLike, title: str = "") -> None:
    """Write a two-panel PNG: distance matrix of all checks (left), per-kind distances by check (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    mat = eb.distance_matrix()
    im = ax1.imshow(mat, cmap="viridis", origin="lower")
    ax1.set_xlabel("check")
    ax1.set_ylabel("check")
    ax1.set_title("mask distance between checks")
    fig.colorbar(im, ax=ax1, fraction=0.046)
    records = [r for r in eb.history if r["distances"]]
    checks = [r["check"] for r in records]
    kinds = sorted({k for r in records for k in r["distances"]})
    for kind in kinds:
        ax2.plot(checks, [r["distances"][kind] for r in records], marker="o", ms=3, label=kind)
    if eb.rule == "absolute":
        ax2.axhline(eb.threshold, ls="--", c="gray", label=f"threshold {eb.threshold:g}")
    else:
        ax2.axhline(eb.threshold * eb.max_distance, ls="--", c="gray", label=f"{eb.threshold:g} x max")
    if eb.ticket is not None:
        ax2.axvline(eb.ticket.found_at["check"], c="red", label="ticket")
    ax2.set_xlabel("check")
    ax2.set_ylabel("normalized Hamming distance to previous check")
    ax2.legend(fontsize=8)
    ax2.set_title(title or "early-bird search")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
