"""PNG plots of a purification: log drift^2 against log Hessian with the reset dimensions marked, and
the reset fraction per parameter tensor."""
from __future__ import annotations

import math
import os


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def drift_plot_text(purify_report: dict, kept: int, reset: int) -> tuple[str, str, str]:
    """The drift plot's title and legend: its points are a sample, and its counts say so beside the
    purification's own (a count of points read as the weights reset misleads by orders)."""
    ranked, num_reset = purify_report.get("ranked_elements"), purify_report.get("num_reset")
    title = f"{purify_report['ranking']}, reserve ratio {purify_report['reserve_ratio']}"
    if ranked is not None and num_reset is not None:
        title += f"\na sample of {kept + reset:,} of {ranked:,} ranked weights; {num_reset:,} reset in all"
    return title, f"kept ({kept:,} in the sample)", f"reset ({reset:,} in the sample)"


def plot_purification(purify_report: dict, out_dir: str, prefix: str = "") -> list[str]:
    plt = _pyplot()
    paths = []
    sample = purify_report.get("sample") or {}
    if sample.get("drift_sq"):
        floor = 1e-30
        xs = [math.log10(h + floor) for h in sample["hessian"]]
        ys = [math.log10(d + floor) for d in sample["drift_sq"]]
        kept = [(x, y) for x, y, r in zip(xs, ys, sample["reset"]) if not r]
        reset = [(x, y) for x, y, r in zip(xs, ys, sample["reset"]) if r]
        fig, ax = plt.subplots(figsize=(6, 5))
        title, kept_label, reset_label = drift_plot_text(purify_report, len(kept), len(reset))
        if kept:
            ax.scatter(*zip(*kept), s=2, alpha=0.3, label=kept_label, color="tab:blue")
        if reset:
            ax.scatter(*zip(*reset), s=2, alpha=0.5, label=reset_label, color="tab:red")
        floor_h = purify_report.get("hessian_floor")
        if floor_h:  # below it every Hessian counts as the floor: the reset boundary bends there
            ax.axvline(math.log10(floor_h + floor), color="grey", ls=":", lw=1, label="Hessian floor")
        ax.set_xlabel("log10 Hessian (clean data; a zero is drawn at -30)")
        ax.set_ylabel("log10 drift^2 (a zero is drawn at -30)")
        ax.set_title(title, fontsize=9)
        ax.legend(markerscale=5)
        path = os.path.join(out_dir, prefix + "drift_vs_hessian.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")  # every label whole, however long
        plt.close(fig)
        paths.append(path)
    counts, numel = purify_report.get("reset_per_parameter", {}), purify_report.get("numel_per_parameter", {})
    if counts:
        names = list(counts)
        fractions = [counts[n] / max(numel.get(n, 1), 1) for n in names]
        # wide enough for the longest name at 5 pt (tight_layout would otherwise cut names on the left)
        fig, ax = plt.subplots(figsize=(4 + 0.045 * max(map(len, names)), max(3, 0.12 * len(names))))
        ax.barh(range(len(names)), fractions, color="tab:red")
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names, fontsize=5)
        ax.invert_yaxis()
        ax.set_xlabel("fraction reset to pre-trained")
        path = os.path.join(out_dir, prefix + "reset_per_layer.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110, bbox_inches="tight")  # every label whole, however long
        plt.close(fig)
        paths.append(path)
    return paths
