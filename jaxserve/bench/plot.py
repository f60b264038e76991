"""The stall picture: inter-token gaps over time per mode (prefill steps shaded) and the ITL CDF.

matplotlib is an optional extra (`pip install 'jaxserve[bench]'`); it is imported only here, only
when a plot is asked for. Works from the report's JSON runs, so a saved JSON can be re-plotted.
"""

from __future__ import annotations

import numpy as np

INSTALL_HINT = ("plotting needs matplotlib, an optional extra: pip install 'jaxserve[bench]' "
                "(or pip install matplotlib)")


def require_matplotlib():
    """Imports matplotlib with a headless backend, or raises ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _gaps(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """(time of the later token, gap in ms) for every consecutive token pair of every request."""
    t, g = [], []
    for r in run["requests"]:
        tt = np.asarray(r["token_times_s"])
        t.append(tt[1:])
        g.append(np.diff(tt) * 1e3)
    if not t:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(t), np.concatenate(g)


def plot_runs(runs: list[dict], path: str, title: str = "") -> str:
    """Writes a PNG: one ITL-over-time panel per run, then the ITL CDF of all runs."""
    plt = require_matplotlib()
    n = len(runs)
    fig, axes = plt.subplots(n + 1, 1, figsize=(10, 3.0 * (n + 1)), squeeze=False)
    axes = axes[:, 0]
    ymax = max((float(_gaps(r)[1].max()) for r in runs if len(_gaps(r)[1])), default=1.0)
    for ax, run in zip(axes, runs):
        label = f"{run['mode']} (chunk_size={run['chunk_size']})"
        for i, step in enumerate(s for s in run["steps"] if s["kind"] == "mixed"):
            ax.axvspan(step["start_s"], step["end_s"], color="tab:orange", alpha=0.25, lw=0,
                       label="mixed (prefill) step" if i == 0 else None)
        t, g = _gaps(run)
        ax.scatter(t, g, s=4, color="tab:blue", label="inter-token gap")
        ax.set_ylim(0, ymax * 1.05)
        ax.set_ylabel("ITL (ms)")
        ax.set_xlabel("time since start (s)")
        ax.set_title(f"{label}: P99 ITL {run['itl_ms']['p99']:.1f} ms, "
                     f"max {run['itl_ms']['max']:.1f} ms")
        ax.legend(loc="upper right", fontsize=8)
    cdf = axes[n]
    for run in runs:
        g = np.sort(_gaps(run)[1])
        if len(g):
            cdf.plot(g, np.arange(1, len(g) + 1) / len(g),
                     label=f"{run['mode']} (chunk_size={run['chunk_size']})")
    cdf.set_xscale("log")
    cdf.set_xlabel("inter-token latency (ms, log)")
    cdf.set_ylabel("fraction of gaps ≤ x")
    cdf.set_title("ITL CDF")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
