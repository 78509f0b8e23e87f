"""The judge of growth: grown networks against the fixed networks a practitioner would train instead.

    python bench/suite.py --dataset cifar10 --data-dir ../shared/data --budget-flops 5M --seeds 3
    python bench/suite.py --dataset fashion-mnist --budget-flops 3M --seeds 3
    python bench/suite.py --dataset cifar10 --data-dir ../shared/data --budget-flops 5M --quick

For one dataset, budget and family, with the same data, splits, epochs and seeds, it trains:

- grown: `grow` with its defaults for the schedule (rounds of DessiLBI, growth, fine-tune);
- grown-scratch: the architecture growth found, trained from scratch with the baselines' recipe
  (separates the shape growth found from the effect of warm-started training);
- the hand shapes of grow.baselines (the seed topology, the classic member, a deeper member),
  each with one width multiplier, the largest that fits the budget; "classic" is the uniform
  baseline a practitioner would use, and "best of K" the best hand shape with K times its compute.

Every fixed network trains with grow.recipe (the recipe of grow's fine-tune: Nesterov SGD, one-cycle,
label smoothing, and the weight decay the grown row gets for these pictures) for as many epochs as the
whole growth run, on train + validation (it makes no decisions that need held-out data), at the peak lr
that suits training from scratch (--scratch-lr,
0.1; 0.2 was worse on the CIFAR-10 pictures, see bench/RESULTS.md), where grow's fine-tune of a
warm-started network uses its own --finetune-lr. Results are cached per (row, seed) in --out, so an
interrupted suite continues where it stopped. Writes suite.json, suite.md and accuracy_compute.png to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grow.baselines import hand_shapes, scale_to_budget  # noqa: E402
from grow.cli import add_run_arguments, config_from_args  # noqa: E402
from grow.controller import GrowConfig, grow_network, resolve_device, training_macs  # noqa: E402
from grow.cost import count_macs, count_params  # noqa: E402
from grow.data import load_dataset  # noqa: E402
from grow.fileio import write_json  # noqa: E402
from grow.policy import Budget  # noqa: E402
from grow.recipe import Recipe, train_spec  # noqa: E402
from grow.report import human  # noqa: E402
from grow.spec import ArchSpec  # noqa: E402
from grow.train import resolve_precision  # noqa: E402

# Schedules of the scenarios: (epochs per round, max rounds, fine-tune epochs), by dataset and
# budget in MACs (None: any budget); anything else runs grow's default schedule.
SCHEDULES = {("cifar10", None): (2, 10, 10), ("fashion-mnist", 3_000_000): (1, 5, 3)}
SCRATCH_LR = 0.1  # peak lr of the networks trained from scratch
SCRATCH_WARMUP = Recipe().warmup  # ... and their warm-up, whatever --finetune-warmup gives the grown network
QUICK = {"epochs_per_round": 1, "max_rounds": 3, "finetune_epochs": 2, "train_subset": 3000}


def schedule_of(dataset: str, budget_macs: Optional[int]) -> tuple[int, int, int]:
    """The scenario's schedule: Fashion-MNIST at 3M MACs trains 8 epochs, at 10M grow's default 26."""
    default = GrowConfig()
    fallback = (default.epochs_per_round, default.max_rounds, default.finetune_epochs)
    return SCHEDULES.get((dataset, budget_macs), SCHEDULES.get((dataset, None), fallback))


def run_grown(config: GrowConfig) -> dict:
    start = time.perf_counter()
    result = grow_network(config)
    final = result.history["final"]
    return {"test_accuracy": final["test_accuracy"], "macs": final["macs"], "params": final["params"],
            "train_macs": training_macs(result.history), "seconds": time.perf_counter() - start,
            "epochs": final["epochs"], "spec": final["spec"]}


@functools.lru_cache(maxsize=2)
def _load(dataset, data_dir, val_fraction, seed, train_subset, download, image_size):
    return load_dataset(dataset, data_dir, val_fraction=val_fraction, seed=seed, train_subset=train_subset,
                        download=download, image_size=image_size)


def splits_of(config: GrowConfig):
    """The splits every row of a seed trains on (read once per seed)."""
    return _load(config.dataset, config.data_dir, config.val_fraction, config.seed, config.train_subset,
                 config.download, config.image_size)


def run_fixed(spec: ArchSpec, config: GrowConfig, epochs: int, lr: float = SCRATCH_LR) -> dict:
    splits = splits_of(config)
    recipe = dataclasses.replace(config.recipe(splits.labelled()), lr=lr, warmup=SCRATCH_WARMUP)
    device = resolve_device(config.device)  # the grown row's device and precision, for a fair clock
    result = train_spec(spec, splits, epochs, recipe, seed=config.seed, batch_size=config.batch_size,
                        augment=config.augments(), include_val=True, device=device,
                        precision=resolve_precision(config.precision, device))
    macs = count_macs(spec)
    return {"test_accuracy": result["test_accuracy"], "macs": macs, "params": count_params(spec),
            "train_macs": 3 * macs * result["images"], "seconds": result["seconds"], "epochs": epochs,
            "spec": spec.to_dict()}


def cached(path: Path, make) -> dict:
    """The result stored at `path`, or make it and store it (atomically)."""
    if path.exists():
        return json.loads(path.read_text())
    result = make()
    write_json(path, result)
    return result


def run_seed(config: GrowConfig, rows: list[str], out: Path, scratch_lr: float = SCRATCH_LR) -> dict[str, dict]:
    """Every row of the suite for one seed (config.seed)."""
    seed_dir = out / f"seed-{config.seed}"
    results: dict[str, dict] = {}
    epochs = config.total_epochs()
    if "grown" in rows or "grown-scratch" in rows:
        grown_cfg = dataclasses.replace(config, out=str(seed_dir / "grown"))
        results["grown"] = cached(seed_dir / "grown.json", lambda: run_grown(grown_cfg))
        print(f"  seed {config.seed} grown: {results['grown']['test_accuracy']:.4f}", flush=True)
    if "grown-scratch" in rows:
        spec = ArchSpec.from_dict(results["grown"]["spec"])
        results["grown-scratch"] = cached(seed_dir / "grown-scratch.json",
                                          lambda: run_fixed(spec, config, epochs, scratch_lr))
        print(f"  seed {config.seed} grown-scratch: {results['grown-scratch']['test_accuracy']:.4f}", flush=True)
    splits_info = splits_of(config).info
    norm = {"mean": list(splits_info.mean), "std": list(splits_info.std)}
    budget = Budget(config.budget_macs, config.budget_params)
    for label, shape in hand_shapes(config.space, splits_info.input_shape, splits_info.num_classes, norm).items():
        if label not in rows:
            continue
        spec = scale_to_budget(shape, budget)
        results[label] = cached(seed_dir / f"{label}.json", lambda: run_fixed(spec, config, epochs, scratch_lr))
        print(f"  seed {config.seed} {label}: {results[label]['test_accuracy']:.4f}", flush=True)
    return results


HAND_ROWS = ("shallow", "classic", "deep")


def hand_rows(rows: dict[str, dict]) -> list[str]:
    """The hand shapes among `rows`, in HAND_ROWS order."""
    return [n for n in HAND_ROWS if n in rows]


def best_hand_shape(rows: dict[str, dict]) -> Optional[str]:
    """The hand shape with the best mean test accuracy (ties: the first of HAND_ROWS), None if none ran."""
    hand = hand_rows(rows)
    return max(hand, key=lambda n: rows[n]["test_accuracy"]) if hand else None


def summarise(per_seed: dict[int, dict[str, dict]]) -> dict[str, dict]:
    """Mean and standard deviation of every figure of every row over the seeds, plus best-of-K."""
    rows: dict[str, dict] = {}
    names = {name for results in per_seed.values() for name in results}
    for name in names:
        values = [results[name] for results in per_seed.values() if name in results]
        row = {"seeds": len(values)}
        for key in ("test_accuracy", "macs", "params", "train_macs", "seconds"):
            xs = [v[key] for v in values]
            row[key] = statistics.fmean(xs)
            row[key + "_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
        row["test_accuracies"] = [v["test_accuracy"] for v in values]
        rows[name] = row
    hand = hand_rows(rows)
    if len(hand) > 1:
        best = best_hand_shape(rows)
        k = len(hand)
        rows[f"best of {k} hand shapes"] = {
            **rows[best], "best": best, "train_macs": k * rows[best]["train_macs"],
            "seconds": sum(rows[n]["seconds"] for n in hand),
        }
    return rows


def paired(per_seed: dict[int, dict[str, dict]], row: str, baseline: str, key: str = "test_accuracy") -> Optional[dict]:
    """`row` minus `baseline` seed by seed, with a 95% confidence interval of the mean difference.

    Every row of a seed trains on the same splits and is scored on the same test pictures, so the
    per-seed differences carry less noise than the two rows' means do; a Student t interval on them
    says whether a lead is more than the seeds' spread. None when no seed has both rows."""
    diffs = [r[row][key] - r[baseline][key] for r in per_seed.values() if row in r and baseline in r]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return {"seeds": 1, "mean": mean, "std": 0.0, "low": None, "high": None}
    from scipy.stats import t
    std = statistics.stdev(diffs)
    half = t.ppf(0.975, len(diffs) - 1) * std / math.sqrt(len(diffs))
    return {"seeds": len(diffs), "mean": mean, "std": std, "low": mean - half, "high": mean + half}


def comparisons(per_seed: dict[int, dict[str, dict]], rows: dict[str, dict]) -> dict[str, dict]:
    """grown against the classic member and against the best hand shape: the paired difference in
    test accuracy (see `paired`) and the ratio of training compute. With grown-scratch, also the
    split of that lead into the path (grown - grown-scratch: the same shape, warm-started by growth
    or trained from scratch) and the shape (grown-scratch - the best hand shape, both from scratch)."""
    best = best_hand_shape(rows)
    if "grown" not in rows or best is None:
        return {}
    pairs = [("grown", name) for name in dict.fromkeys(["classic", best])]
    pairs += [("grown", "grown-scratch"), ("grown-scratch", best)]
    out = {}
    for row, name in pairs:
        if row in rows and name in rows:
            diff = paired(per_seed, row, name)
            if diff is not None:
                out[f"{row} - {name}"] = {**diff, "compute": rows[row]["train_macs"] / rows[name]["train_macs"]}
    return out


ORDER = ["grown", "grown-scratch", "classic", "shallow", "deep"]


def markdown(rows: dict[str, dict], title: str, differences: Optional[dict[str, dict]] = None) -> str:
    lines = [f"**{title}**", "", "| network | test acc (mean +- std) | per seed | MACs | params | train MACs | seconds |",
             "|---|---|---|---|---|---|---|"]
    names = [n for n in ORDER if n in rows] + [n for n in rows if n not in ORDER]
    for name in names:
        r = rows[name]
        label = f"{name} ({r['best']})" if "best" in r else name
        per = ", ".join(f"{a * 100:.1f}" for a in r["test_accuracies"])
        lines.append(f"| {label} | {r['test_accuracy'] * 100:.2f} +- {r['test_accuracy_std'] * 100:.2f} | {per} | "
                     f"{human(r['macs'])} | {human(r['params'])} | {human(r['train_macs'])} | {r['seconds']:.0f} |")
    if differences:
        lines.append("")
    for name, d in (differences or {}).items():
        interval = ("" if d["low"] is None else
                    f" (95% CI {100 * d['low']:+.2f} to {100 * d['high']:+.2f}, {d['seeds']} paired seeds)")
        lines.append(f"{name}: {100 * d['mean']:+.2f} pt test accuracy{interval} at {d['compute']:.2f}x the "
                     f"training compute")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, r in rows.items():
        ax.errorbar(r["train_macs"] / 1e12, 100 * r["test_accuracy"], yerr=100 * r["test_accuracy_std"],
                    marker="*" if name == "grown" else "o", markersize=12 if name == "grown" else 6, capsize=3,
                    label=name)
    ax.set(xlabel="training compute (10^12 MACs)", ylabel="test accuracy (%)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default %(default)s)")
    parser.add_argument("--only-seed", type=int, default=None,
                        help="run this one seed (to spread a suite over processes; the cache joins them)")
    parser.add_argument("--rows", default=",".join(ORDER), help="rows to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="a few minutes: 1-epoch rounds, 3000 images, 1 seed")
    parser.add_argument("--scratch-lr", type=float, default=SCRATCH_LR,
                        help="peak lr of the networks trained from scratch (default %(default)s; cached rows keep "
                             "theirs: give another --out)")
    parser.add_argument("--out", default=None, help="folder for results (default bench/out/<scenario>)")
    parser.set_defaults(epochs_per_round=None, max_rounds=None, finetune_epochs=None)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    schedule = dict(zip(("epochs_per_round", "max_rounds", "finetune_epochs"),
                        schedule_of(args.dataset, args.budget_macs)))
    if args.quick:
        schedule.update(QUICK)
        args.seeds = min(args.seeds, 1)
    for key, value in schedule.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    limits = [(human(n), unit) for n, unit in ((args.budget_macs, "MACs"), (args.budget_params, "params")) if n]
    budget = " and ".join(f"{n} {unit}" for n, unit in limits)
    scenario = "-".join([args.dataset, args.space, *(n if unit == "MACs" else n + unit for n, unit in limits)]
                        + (["quick"] if args.quick else []))
    out = Path(args.out or Path(__file__).parent / "out" / scenario)
    base = config_from_args(args, str(out))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    print(f"suite {scenario}: {base.total_epochs()} epochs per network, seeds 0..{args.seeds - 1}, out {out}",
          flush=True)
    seeds = [args.only_seed] if args.only_seed is not None else range(args.seeds)
    per_seed = {s: run_seed(dataclasses.replace(base, seed=s), rows, out, args.scratch_lr) for s in seeds}
    summary = summarise(per_seed)
    title = (f"{args.dataset}, {args.space}, budget {budget}, {base.total_epochs()} epochs, "
             f"{len(per_seed)} seed(s)")
    differences = comparisons(per_seed, summary)
    table = markdown(summary, title, differences)
    print("\n" + table)
    write_json(out / "suite.json", {"scenario": scenario, "config": base.to_dict(), "rows": summary,
                                    "differences": differences, "per_seed": {str(k): v for k, v in per_seed.items()}})
    (out / "suite.md").write_text(table + "\n")
    plot(summary, out / "accuracy_compute.png", title)


if __name__ == "__main__":
    main()
