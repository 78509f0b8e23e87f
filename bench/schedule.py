"""The shape growth's schedule alone grows: every layer read saturated in every round, no training.

    python bench/schedule.py --input 1,28,28 --budget-flops 3M --rounds 3
    python bench/schedule.py --input 3,32,32 --budget-flops 5M --rounds 4 --order ratio
    python bench/schedule.py --input 3,32,32 --budget-params 300K --rounds 4

With the defaults every vgg and resnet layer reads saturated at the end of every round that grows
(bench/saturation.py, bench/RESULTS.md tenth and eleventh waves), so the final shape is decided by the
order, the step sizes, the deepening rule, the new-stage rule, the budget and the fill deadline. This
replays exactly those decisions (grow.policy.plan_growth with every ratio 1.0, then fill_budget after
--rounds rounds, the run's --fill-by) on untrained networks, so a policy change can be seen in a second
instead of a training run. It printed the shapes the suite's runs grew: Fashion-MNIST 3M [18] [24] [53]
[96, 144] (3 rounds), CIFAR-10 pictures 5M [12, 12] [30] [48] [96] [293] and 20M [24, 18, 18] [54] [108]
[216] [438] (4 rounds each).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grow import morph  # noqa: E402
from grow.baselines import small_seed  # noqa: E402
from grow.cli import _count  # noqa: E402
from grow.controller import GrowConfig  # noqa: E402
from grow.cost import count_macs, count_params  # noqa: E402
from grow.policy import ORDERS, Budget, fill_budget, plan_growth  # noqa: E402
from grow.spec import ArchSpec, build  # noqa: E402


def scheduled_shape(input_shape: tuple[int, ...], num_classes: int, budget: Budget, rounds: int,
                    config: GrowConfig = GrowConfig()) -> ArchSpec:
    """The spec growth ends with when every unit is saturated in each of `rounds` rounds and the
    rest of the budget is spent after the last one (as --fill-by does)."""
    model = build(small_seed(config.space, input_shape, num_classes, budget, config.seed_share))
    for index in range(1, rounds + 1):
        ratios = {u.name: 1.0 for u in morph.units(model)}
        generator = torch.Generator().manual_seed(index)
        model, _, _ = plan_growth(model, ratios, budget, generator=generator, **config.policy_options())
    model, _ = fill_budget(model, budget, {}, reason="the deadline", minimum=config.widen_min)
    return model.spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default="3,32,32", help="C,H,W of the pictures")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--budget-flops", type=_count, default=None, help="MAC limit (at least one limit is needed)")
    p.add_argument("--budget-params", type=_count, default=None, help="parameter limit")
    p.add_argument("--rounds", type=int, default=4, help="growth rounds before the budget is filled (--fill-by)")
    p.add_argument("--space", default="vgg")
    p.add_argument("--order", choices=ORDERS, default=GrowConfig().order)
    p.add_argument("--widen-ratio", type=float, default=GrowConfig().widen_ratio)
    p.add_argument("--deepen-per-round", type=int, default=GrowConfig().deepen_per_round)
    p.add_argument("--seed-share", type=float, default=GrowConfig().seed_share)
    args = p.parse_args()
    if args.budget_flops is None and args.budget_params is None:
        p.error("give --budget-flops, --budget-params or both")
    config = GrowConfig(space=args.space, order=args.order, widen_ratio=args.widen_ratio,
                        deepen_per_round=args.deepen_per_round, seed_share=args.seed_share)
    budget = Budget(args.budget_flops, args.budget_params)
    spec = scheduled_shape(tuple(int(x) for x in args.input.split(",")), args.classes, budget, args.rounds, config)
    print(f"{spec.body['stages']}  {count_macs(spec):,} MACs  {count_params(spec):,} params")


if __name__ == "__main__":
    main()
