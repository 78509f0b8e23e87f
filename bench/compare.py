"""Grown network vs a fixed network of the same family and MACs, trained from scratch with SGD.

    python bench/compare.py --dataset fashion-mnist --budget-flops 3M --epochs-per-round 1 \
        --max-rounds 5 --finetune-epochs 3

The fixed network is the family's seed scaled uniformly (every width times one factor) to the
largest size whose MACs do not exceed the grown network's; it trains for the same total number
of epochs as the whole growth run (rounds + fine-tune), with SGD, momentum, a cosine schedule.
Both see the same data in the same order. Prints accuracy, MACs, params and training compute.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import search_spaces  # noqa: E402
from grow.cli import add_run_arguments, config_from_args  # noqa: E402
from grow.controller import grow_network, resolve_device, training_macs  # noqa: E402
from grow.cost import count_macs, count_params  # noqa: E402
from grow.data import Batches, load_dataset  # noqa: E402
from grow.report import human  # noqa: E402
from grow.spec import build  # noqa: E402
from grow.train import evaluate, train_epoch  # noqa: E402


def scaled_to(seed_spec, family, macs: int):
    """The seed scaled uniformly to the largest width factor whose MACs stay <= `macs`."""
    lo, hi = 0.05, 64.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if count_macs(family.scale(seed_spec, mid)) <= macs:
            lo = mid
        else:
            hi = mid
    return family.scale(seed_spec, lo)


def train_fixed(config, spec, epochs: int) -> dict:
    device = resolve_device(config.device)
    splits = load_dataset(config.dataset, config.data_dir, val_fraction=config.val_fraction, seed=config.seed,
                          train_subset=config.train_subset, download=config.download)
    torch.manual_seed(config.seed)
    model = build(spec).to(device)
    train = Batches(splits.train, config.batch_size, info=splits.info, train=True, device=device, seed=config.seed,
                    augment=config.augments())
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True,
                                weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * len(train))
    start, images = time.perf_counter(), 0
    for epoch in range(epochs):
        train.set_epoch(epoch)
        images += train_epoch(model, optimizer, train, scheduler=scheduler).images
    seconds = time.perf_counter() - start
    val = evaluate(model, Batches(splits.val, 512, info=splits.info, train=False, device=device))
    test = evaluate(model, Batches(splits.test, 512, info=splits.info, train=False, device=device))
    return {"val_accuracy": val[1], "test_accuracy": test[1], "macs": count_macs(spec),
            "params": count_params(spec), "train_macs": 3 * count_macs(spec) * images, "seconds": seconds,
            "epochs": epochs, "spec": spec.to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    parser.add_argument("--out", default="runs/compare")
    args = parser.parse_args()
    out = Path(args.out)
    config = config_from_args(args, str(out / "grown"))

    start = time.perf_counter()
    result = grow_network(config)
    grown_seconds = time.perf_counter() - start
    history = result.history
    final = history["final"]
    epochs = final["epochs"]

    family = search_spaces.get(config.space)
    grown = result.model.spec
    seed_spec = family.seed(grown.input_shape, grown.num_classes, normalization=grown.normalization)
    fixed = train_fixed(config, scaled_to(seed_spec, family, final["macs"]), epochs)

    rows = [
        ("grown (DessiLBI + growth + fine-tune)", final["val_accuracy"], final["test_accuracy"], final["macs"],
         final["params"], training_macs(history), grown_seconds),
        ("fixed (seed scaled to same MACs, SGD)", fixed["val_accuracy"], fixed["test_accuracy"], fixed["macs"],
         fixed["params"], fixed["train_macs"], fixed["seconds"]),
    ]
    print(f"\n{config.dataset}, space {config.space}, budget {human(config.budget_macs or 0)} MACs, "
          f"{epochs} epochs each, seed {config.seed}")
    print(f"{'network':40s} {'val acc':>8s} {'test acc':>8s} {'MACs':>8s} {'params':>8s} {'train MACs':>11s} {'seconds':>8s}")
    for name, val, test, macs, params, train_macs, seconds in rows:
        print(f"{name:40s} {val:8.4f} {test:8.4f} {human(macs):>8s} {human(params):>8s} {human(train_macs):>11s} "
              f"{seconds:8.1f}")
    g, f = rows
    print(f"grown - fixed test accuracy: {g[2] - f[2]:+.4f}; grown training compute = "
          f"{g[5] / f[5]:.2f} x fixed; wall time {g[6] / f[6]:.2f} x")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps({"grown": final, "fixed": fixed, "config": config.to_dict()}, indent=2))


if __name__ == "__main__":
    main()
