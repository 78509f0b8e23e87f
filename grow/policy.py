"""Growth decisions: read Gamma, pick which layers widen and which stages deepen, within a budget.

A unit (a growable width, see grow.morph.units) is *saturated* when its selection ratio -- the
share of its channels whose Gamma group is non-zero -- is at least tau: DessiLBI has switched on
nearly every filter it has, so it is asking for more room. A coupled unit (a residual stage's
stream, written by several convs) counts a channel as on when any of its producers switched it on.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

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

    def step_cost(self, before: ArchSpec, after: ArchSpec) -> float:
        """What growing `before` into `after` spends: the largest share of a set limit it takes (extra
        MACs when no limit is set). The cost order ranks growth's steps by it, so a parameter budget
        buys the capacity that is cheap in parameters (filters at high resolution) as a MAC budget buys
        what is cheap in MACs (filters at low resolution); under a MAC budget alone the order is the
        MAC order."""
        extra_macs = count_macs(after) - count_macs(before)
        shares = [extra_macs / self.macs] if self.macs else []
        if self.params:
            shares.append((count_params(after) - count_params(before)) / self.params)
        return max(shares) if shares else float(extra_macs)


@dataclass
class Action:
    """One growth step that was applied, with the reason a user reads in history.json."""

    kind: str          # "widen" | "deepen" | "extend" (a new stage)
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
    a step smaller than `minimum` filters is not worth a round of training. Costs are read from
    specs; only the chosen network is built."""
    def fits(w: int) -> bool:
        return budget.fits(morph.widened_spec(model, {name: w}))

    best = target if fits(target) else None
    lo, hi = width + minimum, target - 1
    while best is None and lo <= hi:  # largest fitting width, by bisection on specs
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
            if lo == hi:
                best = lo
        else:
            hi = mid - 1
    if best is None:
        return None, None
    return morph.widen(model, {name: best}, generator=generator, init=init), best


def paced(budget: Budget, model: nn.Module, rounds_left: int) -> Budget:
    """The share of the remaining budget one round may spend when growth is spread evenly over
    `rounds_left` more rounds: the final shape is then chosen with the evidence of every round,
    not by the first two, taken while the network has barely learned (DESIGN.md, lessons)."""
    if rounds_left <= 1:
        return budget
    spec = model.spec

    def part(limit: Optional[int], now: int) -> Optional[int]:
        return None if limit is None else now + max(0, limit - now) // rounds_left

    return Budget(part(budget.macs, count_macs(spec)), part(budget.params, count_params(spec)))


def largest_factor(fits: Callable[[float], bool], lo: float, hi: float) -> float:
    """The largest factor in [lo, hi) for which `fits` holds, given that it holds at `lo`.

    Widths are rounded per layer, so cost is a step function of a width factor; it never decreases
    as the factor grows, which makes bisection on the factor exact up to its last step."""
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def fill_budget(model: nn.Module, budget: Budget, ratios: dict[str, float], *, reason: str,
                generator: Optional[torch.Generator] = None, widen_init: str = "fresh", minimum: int = 1,
                max_factor: float = 64.0) -> tuple[nn.Module, list[Action]]:
    """Spend what is left of `budget` at once: every unit widened by one common factor, the largest
    that fits, so the shape growth chose keeps its proportions and trains at full size for the
    rest of the run. Returns the grown model and one widen action per unit that grew; nothing
    changes when no unit would grow by `minimum` filters (the budget is as good as spent)."""
    units = morph.units(model)

    def widths(factor: float) -> dict[str, int]:
        return {u.name: max(u.width, int(round(u.width * factor))) for u in units}

    lo = largest_factor(lambda f: budget.fits(morph.widened_spec(model, widths(f))), 1.0, max_factor)
    before = {u.name: u.width for u in units}
    target = {name: w for name, w in widths(lo).items() if w > before[name]}
    if not target or max(w - before[name] for name, w in target.items()) < minimum:
        return model, []
    grown = morph.widen(model, target, generator=generator, init=widen_init)
    macs, params = count_macs(grown.spec), count_params(grown.spec)
    why = f"{reason}: the rest of the budget spent, every layer x{lo:.2f}"
    return grown, [Action("widen", name, before[name], w, ratios.get(name, 0.0), why, macs, params)
                   for name, w in target.items()]


def _candidates(model, units, ratios, tau, widen_ratio, widen_min, deepen_costs, extend, budget):
    """(kind, target, cost of the full step: Budget.step_cost) of every growth step the ratios ask
    for; `deepen_costs` holds the cost of deepening each stage (that asks for it) by one layer."""
    steps = []
    for unit in units:
        if ratios[unit.name] >= tau:
            target = unit.width + widen_step(unit.width, widen_ratio, widen_min)
            spec = morph.widened_spec(model, {unit.name: target})
            steps.append(("widen", unit, target, budget.step_cost(model.spec, spec)))
    for stage, cost in deepen_costs.items():
        steps.append(("deepen", stage, None, cost))
    if extend:
        steps.append(("extend", len(morph.deepenable(model)), None,
                      budget.step_cost(model.spec, morph.extended_spec(model))))
    return steps


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
    order: str = "ratio",
    widened: Optional[set[str]] = None,
    extend_stages: bool = False,
    max_deepen: Optional[int] = None,
) -> tuple[nn.Module, list[Action], list[str]]:
    """Grow `model` where it is saturated, as far as `budget` allows.

    Returns the grown model, the actions applied, and notes on saturated units that did not fit.
    A stage deepens when every unit in it is saturated; with `widened` (the units widened in earlier
    rounds) only once every unit of the stage has been widened before and is saturated again:
    widening alone has not relieved it. Depth at high resolution is the most expensive capacity
    there is, and on the CIFAR-10 pictures a stage deepened at the first saturation cost a point
    against the same budget spent on width (bench/RESULTS.md).
    At most `max_deepen` stages deepen in one round, the cheapest (ties: the earliest): with every
    saturated stage deepening at once, a large budget goes to depth in one round.
    With `extend_stages`, a saturated last stage also asks for a new stage after one more pooling
    (grow.morph.extend), where the family and the image size allow one.
    order "ratio": widenings first, most saturated first, then deepenings (the first policy).
    order "cost": every asked-for step, widening or deepening, cheapest first (Budget.step_cost: its
    largest share of a set limit): under a MAC budget a filter at low resolution costs a fraction of
    one at high resolution, under a parameter budget the other way round, and a budget spent on cheap
    steps buys more filters. A widening that does not fit in full is shrunk to the widest step that
    does. A deepening waits for the widenings of its stage's layers, since the new layer copies the
    last one's width (see _deepen_after_widening).
    In the cost order a new stage that the cheaper steps left no room for, but that fits on its own
    and takes at most FORCED_STAGE_SHARE of the budget, goes first and the rest follow cheapest
    first: a widening can be cut to fit what is left, a stage cannot, and under a tight budget
    (2.5M MACs and less on 32x32 pictures) the cheap widenings of round 1 otherwise take every MAC
    and no later round can add it. On the CIFAR-10 pictures keeping the stage was worth +1.35 points
    at 2M MACs and +1.53 at 2.5M, six seeds each (bench/RESULTS.md, thirteenth wave).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    units = morph.units(model)
    stages = morph.deepenable(model)

    def full(stage: int) -> bool:
        """Every unit of `stage` saturated (and, with `widened`, widened before)."""
        members = [u for u in units if u.stage == stage]
        return bool(members) and all(ratios[u.name] >= tau and (widened is None or u.name in widened)
                                     for u in members)

    deepen_costs = {s: budget.step_cost(model.spec, morph.deepened_spec(model, s)) for s in stages if full(s)}
    if max_deepen is not None:  # the cheapest stages (ties: the earliest)
        cheapest = sorted(deepen_costs, key=deepen_costs.__getitem__)[:max_deepen]
        deepen_costs = {s: deepen_costs[s] for s in cheapest}
    # A new stage at half resolution when the last stage is as full as a deepening asks for.
    extend = extend_stages and morph.extended_spec(model) is not None and full(max(stages))
    steps = _candidates(model, units, ratios, tau, widen_ratio, widen_min, deepen_costs, extend, budget)
    if order == "ratio":
        steps.sort(key=lambda st: (st[0] == "deepen", -ratios[st[1].name] if st[0] == "widen" else 0))
        return _take(model, steps, units, ratios, budget, tau, widen_min, generator, widen_init)
    steps = _deepen_after_widening(sorted(steps, key=lambda st: st[3]))
    state = generator.get_state() if generator is not None else None
    planned = _take(model, steps, units, ratios, budget, tau, widen_min, generator, widen_init)
    dropped_stage = extend and not any(a.kind == "extend" for a in planned[1])
    stage = morph.extended_spec(model) if dropped_stage else None
    if stage is not None and budget.fits(stage) and budget.step_cost(model.spec, stage) <= FORCED_STAGE_SHARE:
        if generator is not None:
            generator.set_state(state)
        steps.sort(key=lambda st: st[0] != "extend")  # stable: the rest stays cheapest first
        planned = _take(model, steps, units, ratios, budget, tau, widen_min, generator, widen_init)
    return planned


def _deepen_after_widening(steps: list) -> list:
    """`steps` with each deepening moved behind the widenings of its own stage's layers (not of a
    stream or head unit that belongs to the stage), so the stage's widths settle before it grows.

    A new layer copies its stage's last width, so a deepening taken before that stage's widening
    leaves one layer of the old width behind, and every later round adds another: at 96x96 pixels and
    above, where a widening at full resolution costs more than a new narrow layer, the cost order had
    grown stage 0 into [34, 27, 18, 12, 8] before a stage of 82 filters (bench/schedule.py), a
    bottleneck no one would draw; waiting was worth +0.98 points there (CIFAR-10 pictures upsampled
    to 96x96, 15M MACs, six seeds; bench/RESULTS.md, fourteenth wave). Where the widening comes first
    anyway (28x28 and 32x32 pictures up to 40M MACs) nothing changes.
    """
    ordered = [st for st in steps if st[0] != "deepen"]
    for step in (st for st in steps if st[0] == "deepen"):
        at = next((i for i, st in enumerate(ordered) if st[3] > step[3]), len(ordered))
        own = [i + 1 for i, st in enumerate(ordered)
               if st[0] == "widen" and st[1].name.startswith(f"stages.{step[1]}.")]
        ordered.insert(max([at, *own]), step)
    return ordered


def _take(model, steps, units, ratios, budget, tau, widen_min, generator, widen_init):
    """Apply `steps` in their order, each as far as the budget allows; (model, actions, notes)."""
    actions: list[Action] = []
    skipped: list[str] = []
    for kind, target_of, target, _ in steps:
        if kind == "widen":
            grown = _widen_step(model, target_of, target, ratios, budget, tau, widen_min, generator, widen_init)
        elif kind == "extend":
            grown = _extend_step(model, units, ratios, budget, generator)
        else:
            grown = _deepen_step(model, target_of, units, ratios, budget)
        if isinstance(grown, str):
            skipped.append(grown)
            continue
        model, action = grown
        actions.append(action)
    return model, actions, skipped


ORDERS = ("ratio", "cost")
# The most of the budget a new stage may take when it goes ahead of cheaper steps. Under a MAC budget the
# stage at 2x2 pixels is cheap (15-25% of 1.5-2.5M MACs on 32x32 pictures) and worth +1.35 to +1.53 points;
# under a parameter budget the same stage is the dearest capacity there is (74% of 100K parameters), and
# put first it left nothing else: 66.1% against 73.0% for the shape grown without it (CIFAR-10 pictures,
# bench/RESULTS.md, twenty-first wave).
FORCED_STAGE_SHARE = 0.5


def _widen_step(model, unit, target, ratios, budget, tau, widen_min, generator, widen_init):
    """(grown model, action) for widening `unit` towards `target`, or a note on why it did not fit."""
    current = {u.name: u for u in morph.units(model)}[unit.name]
    grown, width = _largest_fitting_widen(model, unit.name, current.width, target, budget, generator,
                                          min(widen_min, target - current.width), widen_init)
    if grown is None:
        return f"{unit.name}: widening by {widen_min} filters exceeds the budget"
    ratio = ratios[unit.name]
    return grown, Action(
        "widen", unit.name, current.width, width, ratio,
        f"selection ratio {ratio:.2f} >= tau {tau:.2f}" + ("" if width == target else f"; step cut from {target} to fit the budget"),
        count_macs(grown.spec), count_params(grown.spec),
    )


def _deepen_step(model, stage, units, ratios, budget):
    """(grown model, action) for one more layer in `stage`, or a note on why it did not fit."""
    depth = morph.stage_depth(model, stage)
    if not budget.fits(morph.deepened_spec(model, stage)):
        return f"stage {stage}: one more layer exceeds the budget"
    grown = morph.deepen(model, stage)
    stage_ratio = min(ratios[u.name] for u in units if u.stage == stage)
    return grown, Action(
        "deepen", f"stage {stage}", depth, depth + 1, stage_ratio,
        f"every unit of stage {stage} is saturated (min ratio {stage_ratio:.2f})",
        count_macs(grown.spec), count_params(grown.spec),
    )


def _extend_step(model, units, ratios, budget, generator):
    """(grown model, action) for a new stage at half resolution, or a note on why it did not fit."""
    stages = len(morph.deepenable(model))
    spec = morph.extended_spec(model)
    if spec is None:
        return "no further stage: the image is too small for another pooling"
    if not budget.fits(spec):
        return f"stage {stages}: a new stage exceeds the budget"
    grown = morph.extend(model, generator)
    ratio = min(ratios[u.name] for u in units if u.stage == stages - 1)
    return grown, Action(
        "extend", f"stage {stages}", stages, stages + 1, ratio,
        f"every unit of the last stage is saturated (min ratio {ratio:.2f}); a filter at half the "
        f"resolution costs a quarter of the MACs", count_macs(grown.spec), count_params(grown.spec),
    )
