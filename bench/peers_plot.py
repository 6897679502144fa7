"""The peer table as a PNG: one bar per (ours, peer) pair, ours/peer on a log scale, 1 marked.

    bench/.tools/peers/bin/python bench/peers_plot.py bench/results/peers-....json bench/peers.png

Run by bench/peers.py with the tools venv's Python: matplotlib is a benchmark tool, not one of the
product's dependencies (./dev bench --peers installs it there, beside barman-cloud).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    import matplotlib  # pyright: ignore[reportMissingImports]  (in bench/.tools/peers, not in .venv)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]

    data = json.loads(Path(sys.argv[1]).read_text())
    rows, meta = data["rows"], data["meta"]
    labels = [f"{r['work']} [{r['where']}]\n{r['ours']}  vs  {r['peer']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(rows) + 1.6))
    y = list(range(len(rows)))[::-1]
    colors = ["#2e7d32" if v <= 1 else "#c62828" for v in ratios]
    ax.barh(y, ratios, color=colors, height=0.6)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=7)
    for yi, v in zip(y, ratios, strict=True):
        ax.text(
            v * 1.03,
            yi,
            f"{v:.2f}",
            va="center",
            fontsize=7,
            bbox={"facecolor": "white", "edgecolor": "none", "pad": 1},
        )
    lo, hi = min(0.5, min(ratios) / 1.3), max(2.0, max(ratios) * 1.4)
    ax.set_xlim(lo, hi)
    ticks = [t for t in (0.125, 0.25, 0.5, 1, 2, 4, 8, 16) if lo <= t <= hi]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("ours / peer, median wall time (log scale; < 1: ours faster)")
    ax.set_title(
        f"dr_pipelines vs peers, {meta['date']}, scale {meta['scale']} ({meta['db_gb']:.2f} GB), "
        f"{meta['rounds']} rounds, same run",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
