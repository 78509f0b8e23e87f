"""Gamma pruning against magnitude pruning, a uniformly scaled network and growth, at the same MACs.

    python bench/prune.py --dataset cifar10 --data-dir ../shared/data --arch resnet20 --fraction 0.5 \
        --pretrain-epochs 15 --epochs 8 --path-epochs 4 --seeds 0,1,2

A user comes with a trained network that is too big. So, per seed, the classic member is trained
(--pretrain-epochs, grow's dense recipe: Nesterov SGD, one-cycle, label smoothing, on train + val),
and every method then has --epochs more; the methods that start from nothing get all of them:
- dense:  the trained member, unpruned (the reference; full MACs, --pretrain-epochs only).
- gamma:  grow.pruning from the trained member: --path-epochs of DessiLBI, filters ranked by when
          Gamma selected them, cut to the budget, the rest of --epochs fine-tuning.
- gamma-layer: the same, but every layer cut by about the same share, each keeping its earliest-selected
          filters (PruneConfig.rank "layer", the paper's per-layer pruning by the Gamma order).
- l1:     the trained member pruned by L1 filter norm with Torch-Pruning's MagnitudePruner (the same
          ratio in every layer, residual channels coupled by its dependency graph, the ratio searched
          so the MACs fit), then --epochs of fine-tuning (the recipe on train + val, as gamma's).
- scaled: the member scaled uniformly to the budget, trained from scratch for pretrain + epochs.
- grow:   grown from the family's seed to the budget (grow_network), rounds + fine-tune = pretrain + epochs.
- ticket: (only with --methods ...,ticket) the early ticket from scratch: DessiLBI from a fresh member,
          Gamma's support at the last epoch that fits, rewound and retrained, pretrain + epochs in all.
Decisions never see the test split; each network is evaluated once on it. Needs `pip install -e .[bench]`.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grow  # noqa: E402
import search_spaces  # noqa: E402
from grow import morph  # noqa: E402
from grow.controller import GrowConfig, grow_network  # noqa: E402
from grow.cost import count_macs, count_params, measure_macs  # noqa: E402
from grow.data import Batches, load_dataset  # noqa: E402
from grow.export import save_model  # noqa: E402
from grow.pruning import PruneConfig, prune_network  # noqa: E402
from grow.recipe import Recipe, merged, train_spec  # noqa: E402
from grow.report import human  # noqa: E402
from grow.train import evaluate, train_epoch  # noqa: E402

METHODS = ("dense", "gamma", "gamma-layer", "l1", "scaled", "grow", "ticket")
DEFAULT_METHODS = METHODS[:-1]
LABEL_SMOOTHING = Recipe().label_smoothing


def largest_scale(spec, family, macs: int):
    """`spec` scaled uniformly to the largest width factor whose MACs stay <= `macs`."""
    lo, hi = 0.01, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_macs(family.scale(spec, mid)) <= macs else (lo, mid)
    return family.scale(spec, lo)


def l1_pruned(model, budget: int, shape):
    """Torch-Pruning's MagnitudePruner (L1 norm of each filter, the same ratio in every layer), with
    the largest ratio step under which the MACs still fit (bisection over the ratio)."""
    import torch_pruning as tp

    def pruned(ratio):
        m = copy.deepcopy(model).cpu().eval()
        tp.pruner.MagnitudePruner(m, torch.rand(1, *shape), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=[m.classifier]).step()
        return m

    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if measure_macs(pruned(mid), shape) <= budget else (mid, hi)
    m = pruned(hi)
    widths = {u.name: m.get_submodule(u.producers[0]).out_channels for u in morph.units(model)}
    m.spec = search_spaces.get(model.spec.family).widen_spec(model.spec, widths)  # still a family member
    assert count_macs(m.spec) == measure_macs(m, shape) <= budget
    return m, hi


def finetune(model, splits, epochs: int, seed: int, batch_size: int, augment: bool, device, lr: float):
    """grow's fine-tune: the recipe on train + validation (as grow.pruning's)."""
    batches = Batches(merged(splits.train, splits.val), batch_size, info=splits.info, train=True, device=device,
                      seed=seed, augment=augment)
    optimizer, scheduler = Recipe(lr=lr).optimizer(model, epochs * len(batches))
    for e in range(epochs):
        batches.set_epoch(100 + e)
        train_epoch(model, optimizer, batches, scheduler=scheduler, label_smoothing=LABEL_SMOOTHING)
    return model


def run_l1(args, splits, dense, budget, seed, device):
    pruned, ratio = l1_pruned(dense, budget, dense.spec.input_shape)
    pruned = finetune(pruned.to(device), splits, args.epochs, seed, args.batch_size, args.augment, device, args.lr)
    test = evaluate(pruned, Batches(splits.test, 512, info=splits.info, train=False, device=device))
    return {"test_accuracy": test[1], "macs": count_macs(pruned.spec), "params": count_params(pruned.spec),
            "ratio": ratio, "spec": pruned.spec.to_dict()}


def run_method(method, args, splits, spec, budget, seed, out: Path, device) -> dict:
    family = search_spaces.get(spec.family)
    total = args.pretrain_epochs + args.epochs
    dense_json = out / f"dense-{seed}" / "model.json"
    common = dict(dataset=args.dataset, data_dir=args.data_dir, seed=seed, device=str(device),
                  train_subset=args.train_subset, augment="on" if args.augment else "off", lr=args.lr)
    if method in ("dense", "scaled"):
        target = spec if method == "dense" else largest_scale(spec, family, budget)
        epochs = args.pretrain_epochs if method == "dense" else total
        r = train_spec(target, splits, epochs, seed=seed, batch_size=args.batch_size, augment=args.augment,
                       device=device)
        save_model(r["model"].cpu(), out / f"{method}-{seed}", metrics={"test_accuracy": r["test_accuracy"]},
                   extra={"classes": list(splits.info.classes)})  # the trained member the pruners start from
        return {"test_accuracy": r["test_accuracy"], "macs": count_macs(target), "params": count_params(target),
                "epochs": epochs, "spec": target.to_dict()}
    if method in ("gamma", "gamma-layer", "ticket"):
        ticket = method == "ticket"
        source = dict(space=spec.family, arch=args.arch) if ticket else dict(from_model=str(dense_json))
        config = PruneConfig(budget_macs=budget, epochs=args.path_epochs, ticket=ticket, path=args.path,
                             rank="layer" if method == "gamma-layer" else "global",
                             finetune_epochs=(total if ticket else args.epochs) - args.path_epochs,
                             out=str(out / f"{method}-{seed}"), **source, **common)
        r = prune_network(config)
        final = r.history["final"]
        return {"test_accuracy": r.test_accuracy, "macs": final["macs"], "params": final["params"],
                "unpruned_test_accuracy_at_cut": r.unpruned_test_accuracy, "ticket_epoch": r.ticket_epoch,
                "val_accuracy_after_cut": r.history["cut"]["val_accuracy_after_cut"], "spec": final["spec"]}
    if method == "l1":
        return run_l1(args, splits, grow.load_model(dense_json).to(device), budget, seed, device)
    rounds = args.grow_rounds
    config = GrowConfig(space=spec.family, budget_macs=budget, epochs_per_round=args.epochs_per_round,
                        max_rounds=rounds, finetune_epochs=total - rounds * args.epochs_per_round,
                        out=str(out / f"grow-{seed}"), **common)
    r = grow_network(config)
    final = r.history["final"]
    return {"test_accuracy": r.test_accuracy, "macs": final["macs"], "params": final["params"], "spec": final["spec"]}


def table(results: list[dict], budget: int) -> str:
    lines = ["| method | test accuracy (mean ± sd) | per seed | MACs | params | seconds |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        acc = [r["test_accuracy"] for r in rows]
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        macs = sorted({human(r["macs"]) for r in rows})
        params = sorted({human(r["params"]) for r in rows})
        lines.append(f"| {method} | {100 * statistics.mean(acc):.2f} ± {100 * sd:.2f} | "
                     f"{' / '.join(f'{100 * a:.2f}' for a in acc)} | {', '.join(macs)} | {', '.join(params)} | "
                     f"{statistics.mean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines) + f"\n\nbudget {human(budget)} MACs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--space", default="resnet")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--fraction", type=float, default=0.5, help="budget = this share of the member's MACs")
    p.add_argument("--pretrain-epochs", type=int, default=15, help="training of the member the pruners start from")
    p.add_argument("--epochs", type=int, default=8, help="epochs each method has after that (from scratch: both)")
    p.add_argument("--path-epochs", type=int, default=4, help="gamma: DessiLBI epochs of the --epochs before the cut")
    p.add_argument("--path", type=float, default=PruneConfig.path, help="gamma: how far Gamma's path goes")
    p.add_argument("--epochs-per-round", type=int, default=2, help="grow's round length")
    p.add_argument("--grow-rounds", type=int, default=6, help="grow's most rounds")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-augment", dest="augment", action="store_false")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    p.add_argument("--out", default="runs/bench-prune")
    p.add_argument("--report", nargs="*", metavar="RESULTS_JSON",
                   help="only print the table of these results.json files (e.g. of seeds run in parallel)")
    args = p.parse_args()
    if args.report is not None:
        results = [r for path in args.report for r in json.loads(Path(path).read_text())]
        print(table(results, results[0]["budget"]))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []  # a rerun skips what is done
    device = torch.device("cpu")
    for seed in [int(s) for s in args.seeds.split(",")]:
        splits = load_dataset(args.dataset, args.data_dir, seed=seed, train_subset=args.train_subset, download=False)
        info = splits.info
        spec = search_spaces.get(args.space).classic(args.arch, info.input_shape, info.num_classes,
                                                     normalization={"mean": list(info.mean), "std": list(info.std)})
        budget = int(args.fraction * count_macs(spec))
        for method in args.methods.split(","):
            if any(r["method"] == method and r["seed"] == seed for r in results):
                continue
            start = time.perf_counter()
            r = run_method(method, args, splits, spec, budget, seed, out, device)
            r.update(method=method, seed=seed, seconds=time.perf_counter() - start, budget=budget)
            results.append(r)
            results_path.write_text(json.dumps(results, indent=2))
            print(f"{method} seed {seed}: test {r['test_accuracy']:.4f}, {human(r['macs'])} MACs, "
                  f"{r['seconds']:.0f} s", flush=True)
    print(f"\n{args.dataset}, {args.arch} pruned to {args.fraction:g} of its MACs; pruners: {args.pretrain_epochs} "
          f"epochs of the member + {args.epochs}; from scratch: {args.pretrain_epochs + args.epochs} epochs")
    print(table(results, budget))


if __name__ == "__main__":
    main()
