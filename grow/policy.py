"""Growth decisions: read Gamma, pick which layers widen and which stages deepen, within a budget.

A unit (a growable width, see grow.morph.units) is *saturated* when its selection ratio -- the
share of its channels whose Gamma group is non-zero -- is at least tau: DessiLBI has switched on
nearly every filter it has, so it is asking for more room. A coupled unit (a residual stage's
stream, written by several convs) counts a channel as on when any of its producers switched it on.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from grow import morph
from grow.cost import count_macs, count_params
from grow.spec import ArchSpec


@dataclass(frozen=True)
class Budget:
    """Upper bounds on multiply-accumulates per image and on parameters; None means unbounded."""

    macs: Optional[int] = None
    params: Optional[int] = None

    def fits(self, model: nn.Module | ArchSpec) -> bool:
        """Whether a model (or a spec: nothing is built) is within the budget."""
        spec = getattr(model, "spec", model)
        if self.macs is not None and count_macs(spec) > self.macs:
            return False
        return self.params is None or count_params(spec) <= self.params


@dataclass
class Action:
    """One growth step that was applied, with the reason a user reads in history.json."""

    kind: str          # "widen" | "deepen"
    target: str        # unit name, or "stage N"
    before: int        # width, or number of layers/blocks of the stage
    after: int
    ratio: float       # selection ratio that triggered it
    reason: str
    macs: int          # cost of the whole network once this action is applied
    params: int

    def to_dict(self) -> dict:
        return asdict(self)


def lbi_param_groups(model: nn.Module) -> list[dict]:
    """Optimizer groups: the weights of every unit's producer convs carry Gamma ('filter'
    structure); everything else (classifier, BatchNorm, depthwise convs) trains without one."""
    producer_weights = {
        id(model.get_submodule(name).weight): model.get_submodule(name).weight
        for unit in morph.units(model)
        for name in unit.producers
    }
    rest = [p for p in model.parameters() if id(p) not in producer_weights]
    return [
        {"params": list(producer_weights.values()), "structure": "filter"},
        {"params": rest, "structure": None},
    ]


@torch.no_grad()
def selection_ratios(model: nn.Module, optimizer) -> dict[str, float]:
    """Selection ratio of every unit of `model` under the DessiLBI `optimizer`."""
    ratios = {}
    for unit in morph.units(model):
        on = None
        for name in unit.producers:
            selected = optimizer.selected(model.get_submodule(name).weight)
            on = selected if on is None else on | selected
        ratios[unit.name] = float(on.float().mean()) if on is not None else 0.0
    return ratios


def widen_step(width: int, ratio: float, minimum: int) -> int:
    return max(minimum, math.ceil(width * ratio))


def _largest_fitting_widen(model, name, width, target, budget, generator, minimum, init):
    """Widest version of `name` in [width + minimum, target] that fits the budget, or None:
    a step smaller than `minimum` filters is not worth a round of training."""
    candidate = morph.widen(model, {name: target}, generator=generator, init=init)
    if budget.fits(candidate):
        return candidate, target
    lo, hi, best = width + minimum, target - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        candidate = morph.widen(model, {name: mid}, generator=generator, init=init)
        if budget.fits(candidate):
            best, lo = (candidate, mid), mid + 1
        else:
            hi = mid - 1
    return best if best is not None else (None, None)


def plan_growth(
    model: nn.Module,
    ratios: dict[str, float],
    budget: Budget,
    *,
    tau: float,
    widen_ratio: float,
    widen_min: int,
    generator: Optional[torch.Generator] = None,
    widen_init: str = "fresh",
) -> tuple[nn.Module, list[Action], list[str]]:
    """Grow `model` where it is saturated, most saturated first, as far as the budget allows.

    Returns the grown model, the actions applied, and notes on saturated units that did not fit.
    Widening is tried before deepening for each stage, since a wider layer costs less latency
    than an extra one; a stage deepens when every unit in it is saturated (widening alone has
    not relieved it). A widening that does not fit in full is shrunk to the widest step that does.
    """
    units = morph.units(model)
    saturated = sorted((u for u in units if ratios[u.name] >= tau), key=lambda u: -ratios[u.name])
    deepen_stages = [
        s for s in morph.deepenable(model)
        if all(ratios[u.name] >= tau for u in units if u.stage == s)
        and any(u.stage == s for u in units)
    ]
    actions: list[Action] = []
    skipped: list[str] = []
    for unit in saturated:
        target = unit.width + widen_step(unit.width, widen_ratio, widen_min)
        grown, width = _largest_fitting_widen(model, unit.name, unit.width, target, budget, generator,
                                              min(widen_min, target - unit.width), widen_init)
        if grown is None:
            skipped.append(f"{unit.name}: widening by {widen_min} filters exceeds the budget")
            continue
        model = grown
        actions.append(Action(
            "widen", unit.name, unit.width, width, ratios[unit.name],
            f"selection ratio {ratios[unit.name]:.2f} >= tau {tau:.2f}"
            + ("" if width == target else f"; step cut from {target} to fit the budget"),
            count_macs(model.spec), count_params(model.spec),
        ))
    for stage in deepen_stages:
        depth = morph.stage_depth(model, stage)
        grown = morph.deepen(model, stage)
        if not budget.fits(grown):
            skipped.append(f"stage {stage}: one more layer exceeds the budget")
            continue
        model = grown
        stage_ratio = min(ratios[u.name] for u in units if u.stage == stage)
        actions.append(Action(
            "deepen", f"stage {stage}", depth, depth + 1, stage_ratio,
            f"every unit of stage {stage} is saturated (min ratio {stage_ratio:.2f})",
            count_macs(model.spec), count_params(model.spec),
        ))
    return model, actions, skipped
