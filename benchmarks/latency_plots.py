"""Plots of the latency benchmarks: measured latency against FLOPs (random weights) or held-out
fidelity (real weights), for SPA (uniform channel ratio, FLOPs target, latency target) and
Torch-Pruning, one file per model: ``results/latency_target_<model>.png``.

Reads ``results/latency_target.json`` and ``results/latency_fidelity*.json``; measures nothing.

    python -m benchmarks.latency_plots
"""

from __future__ import annotations

import json

from benchmarks.common import RESULTS

#: Series of the plots: label → prefix of the runs in the results.
SERIES = {"SPA uniform": "uniform_", "SPA --target flops": "flops_",
          "SPA --target latency": "latency_", "Torch-Pruning (L1)": "torch_pruning_",
          "Torch-Pruning (L1, round_to block)": "tp_rounded_"}


def _axes(title: str, xlabel: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency, ms (1 thread, CPU time)")
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig, ax, name: str) -> None:
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"latency_target_{name}.png", dpi=110)


def random_weights(d: dict) -> None:
    """Latency against GMACs per model of ``latency_target.json``."""
    for key, r in d["results"].items():
        fig, ax = _axes(r["model"], "GMACs")
        dense = r["dense_flops"] / 1e9
        ax.scatter([dense], [r["latency_ms_dense"]], c="k", marker="*", s=80, label="dense")
        for label, prefix in SERIES.items():
            pts = sorted((run["flops"] / 1e9 if "flops" in run
                          else dense / run["flops_reduction_x"], run["latency_ms_pruned"])
                         for name, run in r["runs"].items() if name.startswith(prefix))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        _save(fig, ax, key)


def real_weights(d: dict, name: str = "efficientnet_lite0_real") -> None:
    """Latency against held-out fidelity (top-1 agreement, or embedding cosine),
    ``latency_fidelity*.json``."""
    criterion = d.get("criterion", "l1")
    title = d["model"] + ("" if criterion == "l1" else f", SPA --criterion {criterion}")
    fig, ax = _axes(title, f"held-out {d['metric'].replace('_', ' ')} with dense")
    ax.scatter([1.0], [d["dense_latency_ms"]], c="k", marker="*", s=80, label="dense")
    for label, prefix in SERIES.items():
        pts = sorted((row[d["metric"]], row["latency_ms"]) for name, row in d["results"].items()
                     if name.removeprefix("spa_").startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    _save(fig, ax, name)


def main() -> None:
    plots = (("latency_target", random_weights), ("latency_fidelity", real_weights),
             ("latency_fidelity_minilm", lambda d: real_weights(d, "minilm_real")),
             ("latency_fidelity_obspa",
              lambda d: real_weights(d, "efficientnet_lite0_real_obspa")))
    for name, plot in plots:
        path = RESULTS / f"{name}.json"
        if path.is_file():
            plot(json.loads(path.read_text()))


if __name__ == "__main__":
    main()
