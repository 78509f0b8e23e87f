"""PNG plots of a run: the selection-ratio path (the inverse scale space), widths, accuracy vs MACs."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _series(history: dict) -> tuple[dict[str, list], dict[str, list]]:
    """Per unit: (epoch, selection ratio) points and (round, width) points."""
    ratios: dict[str, list] = {}
    widths: dict[str, list] = {}
    for r in history["rounds"]:
        for e in r["epochs"]:
            samples = [*e.get("selection_path", []), [e["epoch"], e["selection_ratio"]]]
            for t, values in samples:
                for name, value in values.items():
                    ratios.setdefault(name, []).append((t, value))
        for name, width in r["widths"].items():
            widths.setdefault(name, []).append((r["round"], width))
    return ratios, widths


def _lines(ax, series: dict[str, list], marker: str = "o") -> None:
    for name, points in series.items():
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker=marker, markersize=3, label=name)
    if len(series) <= 16:
        ax.legend(fontsize=7, ncol=2)


def plot_history(history: dict, out: str | Path) -> list[Path]:
    """Write selection_ratio.png, widths.png and accuracy_macs.png into `out`; return their paths."""
    out = Path(out)
    ratios, widths = _series(history)
    tau = history["config"]["tau"]
    paths = []

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, ratios, marker="")
    ax.axhline(tau, color="grey", linestyle="--", linewidth=1)
    for r in history["rounds"][:-1]:
        ax.axvline(r["epochs"][-1]["epoch"], color="lightgrey", linewidth=0.8)
    ax.set(xlabel="epoch of the rounds (each at most --round-steps batches)",
           ylabel="selection ratio (share of filters with Gamma != 0)",
           title=f"Gamma path per layer (dashed: tau = {tau}; grey: growth steps)", ylim=(-0.02, 1.02))
    paths.append(_save(fig, out / "selection_ratio.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, widths)
    ax.set(xlabel="round", ylabel="width (output channels)", title="layer widths over rounds")
    paths.append(_save(fig, out / "widths.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    macs = [r["macs"] / 1e6 for r in history["rounds"]]
    acc = [r["val_accuracy"] for r in history["rounds"]]
    ax.plot(macs, acc, marker="o", label="end of round (DessiLBI)")
    for m, a, r in zip(macs, acc, history["rounds"]):
        ax.annotate(str(r["round"]), (m, a), fontsize=8, xytext=(3, 3), textcoords="offset points")
    finetuned = (history.get("finetune") or {}).get("epochs") or []
    if finetuned and finetuned[-1]["val_accuracy"] is not None:
        from grow.controller import finetuned_macs
        ax.plot([finetuned_macs(history) / 1e6], [finetuned[-1]["val_accuracy"]], marker="*", markersize=12,
                linestyle="none", label="after fine-tune")
    ax.set(xlabel="MACs per image (millions)", ylabel="validation accuracy", title="accuracy against cost")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "accuracy_macs.png"))
    return paths


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_prune(history: dict, out: str | Path) -> list[Path]:
    """Write prune_path.png (the Gamma path of each layer with the cut marked) and widths.png (each
    layer's width before and after pruning) into `out`; return their paths."""
    out = Path(out)
    ratios, _ = _series(history)
    cut = history["cut"]
    what = "ticket taken" if cut["method"] == "ticket" else "cut"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _lines(ax, ratios, marker="")
    ax.axvline(cut["epoch"], color="red", linestyle="--", linewidth=1.2)
    ax.set(xlabel="epoch", ylabel="selection ratio (share of filters with Gamma != 0)",
           title=f"Gamma path per layer (red: {what} after epoch {cut['epoch']})", ylim=(-0.02, 1.02))
    paths = [_save(fig, out / "prune_path.png")]

    names = list(cut["widths_before"])
    x = list(range(len(names)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(names) + 2), 4.5))
    ax.bar([i - 0.2 for i in x], [cut["widths_before"][n] for n in names], width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], [cut["widths_after"][n] for n in names], width=0.4, label="after")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set(ylabel="width (channels)", title=f"widths before and after pruning ({cut['macs_before'] / 1e6:.3g}M -> "
                                            f"{cut['macs_after'] / 1e6:.3g}M MACs)")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / "widths.png"))
    return paths
