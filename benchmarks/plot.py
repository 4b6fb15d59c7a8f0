"""PNG plot of the S1 token sweep: time vs T per implementation, log-log, one panel per pass."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import List, Optional


def sweep_plot(cases: List[dict], path: Path, title: str) -> Optional[str]:
    """Write the plot; returns None, or why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    sweep = [c for c in cases if c.get("group") == "sweep" and c.get("status") == "ok"]
    if not sweep:
        return "no successful sweep cases to plot"
    passes = sorted({c["pass"] for c in sweep}, key=["fwd", "bwd", "fwdbwd"].index)
    fig, axes = plt.subplots(1, len(passes), figsize=(6.5 * len(passes), 4.8), squeeze=False)
    for ax, p in zip(axes[0], passes):
        series = defaultdict(list)
        for c in sweep:
            if c["pass"] == p:
                series[c["impl"]].append((c["tokens"], c["median_ms"], c.get("q25_ms"), c.get("q75_ms")))
        for impl, pts in sorted(series.items()):
            pts.sort()
            t = [q[0] for q in pts]
            m = [q[1] for q in pts]
            ax.plot(t, m, marker="o", label=impl)
            lo = [q[2] if q[2] is not None else q[1] for q in pts]
            hi = [q[3] if q[3] is not None else q[1] for q in pts]
            ax.fill_between(t, lo, hi, alpha=0.2)
        floors = sorted({(c["tokens"], c["floor_ms"]) for c in sweep if c["pass"] == p and c.get("floor_ms")})
        if floors:
            ax.plot([f[0] for f in floors], [f[1] for f in floors], "k--", label="floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"S1 sweep, {p}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
