"""Function-preserving growth: widen a layer or deepen a stage without changing what the net computes;
and its inverse, `prune`, which removes channels physically.

Every operation is a spec-to-spec change plus a weight transfer by parameter name: the new
network is built from the new spec, and every old tensor (parameters and buffers) is copied into
the leading slice of its new counterpart. What is new is initialised so that the grown network's
eval-mode output is exactly the old one, while the new filters can still learn:

- a new output filter gets random incoming weights at the mean norm of the layer's filters;
- every existing output ignores new input channels: those weights are zero;
- BatchNorm of a new channel starts at weight 1, bias 0, running mean 0, variance 1;
- an appended layer or block is the identity (family-specific: identity kernel, or a residual
  branch whose last BatchNorm weight is zero).

Zero outgoing weights with random incoming ones still learn: the new channels carry non-zero
activations, so the first step gives their outgoing weights a gradient, and from then on the
gradient reaches the incoming weights too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, overload

import torch
from torch import nn

from grow.spec import ArchSpec, build


@dataclass(frozen=True)
class Unit:
    """One growable width of a network.

    name: a module name of the model (for a coupled residual stream, one name for the group);
    producers: the convs whose output channels are this unit's channels (they carry Gamma).
    """

    name: str
    width: int
    producers: tuple[str, ...]
    stage: int
    kind: str


def _family(spec: ArchSpec):
    from search_spaces import get
    return get(spec.family)


def units(model: nn.Module) -> list[Unit]:
    """The growable widths of `model`, in forward order."""
    return [Unit(*u) for u in _family(model.spec).units(model.spec)]


def widenable(model: nn.Module) -> list[str]:
    """Names of the layers (or coupled groups) whose output width may grow."""
    return [u.name for u in units(model)]


def deepenable(model: nn.Module) -> list[int]:
    """Stages that accept one more layer or block at their end."""
    return _family(model.spec).deepenable(model.spec)


def stage_depth(model: nn.Module, stage: int) -> int:
    """Number of layers or blocks in `stage`."""
    family = _family(model.spec)
    if stage not in family.deepenable(model.spec):
        raise ValueError(f"the network has no stage {stage!r}; its stages: {family.deepenable(model.spec)}")
    return family.stage_depth(model.spec, stage)


def widened_spec(model: nn.Module, widths: dict[str, int]) -> ArchSpec:
    """The spec `widen(model, widths)` would build, without building it (for costing a step)."""
    return _family(model.spec).widen_spec(model.spec, widths)


def deepened_spec(model: nn.Module, stage: int) -> ArchSpec:
    """The spec `deepen(model, stage)` would build, without building it."""
    return _family(model.spec).deepen_spec(model.spec, stage)


def extended_spec(model: nn.Module | ArchSpec) -> Optional[ArchSpec]:
    """The spec `extend(model)` would build (for a model, or a spec: nothing is built), or None where the
    family or the image size allows no further stage."""
    spec = getattr(model, "spec", model)
    extend_spec = getattr(_family(spec), "extend_spec", None)
    return extend_spec(spec) if extend_spec else None


WIDEN_INITS = ("split", "fresh")


def widen(model: nn.Module, widths: dict[str, int], generator: Optional[torch.Generator] = None,
          init: str = "fresh") -> nn.Module:
    """A new network in which each named unit has the given (larger) width; `model` is untouched.

    init "fresh": new filters get random incoming weights and zero outgoing ones (see the module
    docstring). init "split" (Net2Net): each new filter is a copy of a random old filter, and the
    old filter's outgoing weights are shared between it and its copies in random proportions, so
    the function is unchanged, the copies start with the layer's trained features and full
    gradient, and unequal shares make them diverge.
    """
    if init not in WIDEN_INITS:
        raise ValueError(f"init must be one of {WIDEN_INITS}, got {init!r}")
    current = {u.name: u.width for u in units(model)}
    for name, width in widths.items():
        if name not in current:
            raise ValueError(f"{name!r} is not a growable layer; choose from {', '.join(current)}")
        if not isinstance(width, int) or width < current[name]:
            raise ValueError(f"{name!r} has {current[name]} filters; a new width must be an integer >= that, got {width}")
    if init == "split":
        for name, width in widths.items():  # one unit at a time: its channels are the tensors that grew
            model = _split(model, _family(model.spec).widen_spec(model.spec, {name: width}), generator)
        return model
    spec = _family(model.spec).widen_spec(model.spec, widths)
    return _transfer(model, spec, generator)


@torch.no_grad()
def _split(model: nn.Module, spec: ArchSpec, generator: Optional[torch.Generator]) -> nn.Module:
    """Widen the one unit that `spec` widens by copying old channels (see `widen`).

    Family-agnostic: every tensor whose dim 0 grew carries the unit's channels as outputs
    (producer convs, BatchNorm, depthwise convs, which pass channels through), every tensor whose
    dim 1 grew reads them (consumer convs, the classifier).
    """
    new = _transfer(model, spec, generator)
    old_state, new_state = model.state_dict(), new.state_dict()
    grown = [(name, t) for name, t in new_state.items() if t.dim() > 0 and t.shape != old_state[name].shape]
    if not grown:
        return new
    name0, t0 = grown[0]
    dim = 0 if t0.shape[0] != old_state[name0].shape[0] else 1
    before, after = old_state[name0].shape[dim], t0.shape[dim]
    source = torch.randint(0, before, (after - before,), generator=generator)
    channels = torch.cat([torch.arange(before), source])
    shares = torch.rand(after, generator=generator, dtype=torch.float64) + 0.5  # in [0.5, 1.5)
    totals = torch.zeros(before, dtype=torch.float64).index_add_(0, channels, shares)
    shares = shares / totals[channels]  # the shares of one old channel and its copies sum to 1
    readers = []
    for name, t in grown:
        old = old_state[name]
        if t.shape[0] != old.shape[0]:
            t.copy_(_rows_of(old, channels.to(old.device), t))
        if t.dim() > 1 and t.shape[1] != old.shape[1]:  # t holds the old columns, then zeros
            t.copy_(_share_columns(t, channels, shares))
            readers.append(name)
    new._split_log = [*new._split_log, (channels, shares, set(readers))]
    return new


def _share_columns(t: torch.Tensor, channels: torch.Tensor, shares: Optional[torch.Tensor]) -> torch.Tensor:
    """`t` with its leading len(channels) columns replaced by columns `channels` (times `shares`)."""
    view = (1, -1) + (1,) * (t.dim() - 2)
    out = t.clone()
    cols = t[:, channels.to(t.device)]
    out[:, : len(channels)] = cols if shares is None else cols * shares.to(t.device, t.dtype).view(view)
    return out


def _rows_of(old: torch.Tensor, channels: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Rows `channels` of `old`, padded with zero columns where `new` also has more columns."""
    rows = old[channels]
    if new.dim() > 1 and new.shape[1] > old.shape[1]:
        pad = rows.new_zeros((rows.shape[0], new.shape[1] - old.shape[1]) + tuple(rows.shape[2:]))
        rows = torch.cat([rows, pad], dim=1)
    return rows


def deepen(model: nn.Module, stage: int, generator: Optional[torch.Generator] = None) -> nn.Module:
    """A new network with one identity layer or block appended to `stage`; `model` is untouched."""
    family = _family(model.spec)
    if stage not in family.deepenable(model.spec):
        raise ValueError(f"stage {stage} cannot deepen; deepenable stages: {family.deepenable(model.spec)}")
    new = _transfer(model, family.deepen_spec(model.spec, stage), generator)
    family.init_new_layer(new, stage)
    return new


def extend(model: nn.Module, generator: Optional[torch.Generator] = None) -> nn.Module:
    """A new network with one more stage at half the last stage's resolution; `model` is untouched.

    Not exactly function-preserving, unlike widen and deepen: the new stage starts as the identity on
    the old features, but the classifier now reads them through one more 2x2 pooling. A filter at
    half the resolution costs a quarter of the MACs, which makes a new stage the cheapest capacity
    growth can add to a saturated last stage.
    """
    spec = extended_spec(model)
    if spec is None:
        raise ValueError(f"this {model.spec.family} network cannot take another stage")
    new = _transfer(model, spec, generator)
    _family(model.spec).init_new_stage(new)
    return new


def _transfer(model: nn.Module, spec: ArchSpec, generator: Optional[torch.Generator]) -> nn.Module:
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        if generator is not None:
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        new = build(spec)
    new.to(device=param.device, dtype=param.dtype)
    new.train(model.training)
    new._split_log = list(getattr(model, "_split_log", ()))  # splits since the optimizer state last moved
    old_state = model.state_dict()
    with torch.no_grad():
        for name, tensor in new.state_dict().items():
            if name in old_state:
                _embed(tensor, old_state[name], zero_new_inputs=True)
    return new


def _embed(new: torch.Tensor, old: torch.Tensor, zero_new_inputs: bool) -> None:
    """Copy `old` into the leading slice of `new`; with zero_new_inputs, existing outputs
    (rows of a weight) get zero weight from new inputs (columns), and new output rows keep
    their random direction at the mean norm of the old rows."""
    if old.dim() == 0:
        new.copy_(old)
        return
    if zero_new_inputs and new.dim() >= 2:
        if new.shape[1] > old.shape[1]:
            new[: old.shape[0], old.shape[1]:] = 0
        if new.shape[0] > old.shape[0]:
            _match_norms(new[old.shape[0]:], old)
    new[tuple(slice(0, n) for n in old.shape)] = old


def _match_norms(rows: torch.Tensor, old: torch.Tensor) -> None:
    """Scale new filters to the typical norm of the layer's trained filters.

    A fresh initialisation is much smaller than trained filters, and DessiLBI pulls unselected
    filters towards zero: new filters that start small never accumulate enough Z to be selected,
    and the layer could never report saturation again. At the layer's own scale they compete on
    equal terms. Their outgoing weights are zero, so the function is unchanged.
    """
    target = old.flatten(1).norm(dim=1).mean()
    norms = rows.flatten(1).norm(dim=1).clamp_min(1e-12)
    rows.mul_((target / norms).view(-1, *([1] * (rows.dim() - 1))))


def move_optimizer_state(old_model: nn.Module, old_opt: torch.optim.Optimizer,
                         new_model: nn.Module, new_opt: torch.optim.Optimizer) -> None:
    """Carry per-parameter optimizer state (momentum, DessiLBI's Z and Gamma) across growth.

    Old entries keep their values, new entries start at zero, parameters that did not exist
    get no state (the optimizer starts them at zero), so Gamma's path continues. Where a widening
    split filters (init "split"), the readers' columns of Z and Gamma are shared like the weights,
    so that W - Gamma keeps its meaning, and their momentum is copied (a copy's column sees the
    same gradient as its original's). The record of those splits is consumed.
    """
    log = getattr(new_model, "_split_log", [])
    old_params = dict(old_model.named_parameters())
    for name, p in new_model.named_parameters():
        old_p = old_params.get(name)
        if old_p is None or old_p not in old_opt.state:
            continue
        state = {}
        for key, value in old_opt.state[old_p].items():
            if torch.is_tensor(value) and value.shape == old_p.shape:
                fresh = torch.zeros_like(p)
                _embed(fresh, value.to(p.device), zero_new_inputs=False)
                for channels, shares, readers in log:
                    if name in readers:
                        fresh = _share_columns(fresh, channels, shares if key in ("z", "gamma") else None)
                state[key] = fresh
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
        new_opt.state[p] = state
    new_model._split_log = []


# --- pruning: the inverse of widen -----------------------------------------------------------

@overload
def prune(model: nn.Module, keep: Mapping[str, Sequence[int]], optimizer: None = None) -> nn.Module: ...
@overload
def prune(model: nn.Module, keep: Mapping[str, Sequence[int]],
          optimizer: torch.optim.Optimizer) -> tuple[nn.Module, torch.optim.Optimizer]: ...


def prune(model, keep, optimizer=None):
    """A new network in which each named unit keeps only the channels `keep[name]`; `model` is untouched.

    `keep` maps a unit name (as in `units(model)`) to the channel indices that stay. A coupled unit
    (a residual stream) loses the same channels in every producer and every reader, BatchNorm
    included, and the spec follows. The output is unchanged when every removed channel's outgoing
    weights (the readers' columns) are zero; otherwise it moves by what those weights carried, which
    fine-tuning recovers. With an `optimizer` of `model` (torch's optimizers, DessiLBI) the call
    returns (network, optimizer): a new optimizer of the same class and settings over the pruned
    network whose state (momentum, DessiLBI's Z and Gamma) keeps the entries of the kept channels.
    """
    current = {u.name: u.width for u in units(model)}
    chosen = _check_keep(keep, current)
    family = _family(model.spec)
    kept: dict[str, list[Optional[torch.Tensor]]] = {}  # per tensor and dim: the original indices kept
    new = model
    for name, channels in chosen.items():
        if len(channels) < current[name]:
            new = _remove(new, family.widen_spec(new.spec, {name: len(channels)}), channels, kept)
    if new is model:
        new = _remove(model, model.spec, torch.arange(0), kept)  # a copy: `model` stays untouched
    if optimizer is None:
        return new
    return new, _pruned_optimizer(model, optimizer, new, kept)


def _check_keep(keep: Mapping[str, Sequence[int]], current: dict[str, int]) -> dict[str, torch.Tensor]:
    """The kept channels of each unit as a sorted index tensor; ValueError says what is wrong."""
    chosen = {}
    for name, channels in keep.items():
        if name not in current:
            raise ValueError(f"{name!r} is not a prunable layer; choose from {', '.join(current)}")
        index = torch.as_tensor(channels).flatten()
        if index.numel() and (index.dtype.is_floating_point or index.dtype == torch.bool):
            raise ValueError(f"{name!r}: channels to keep must be integer indices, got {index.dtype}")
        index = index.long()
        if index.numel() == 0:
            raise ValueError(f"{name!r}: keep at least one channel")
        if index.min() < 0 or index.max() >= current[name]:
            raise ValueError(f"{name!r} has channels 0..{current[name] - 1}; cannot keep {index.tolist()}")
        if index.unique().numel() != index.numel():
            raise ValueError(f"{name!r}: a channel to keep is listed twice")
        chosen[name] = index.sort().values
    return chosen


@torch.no_grad()
def _remove(model: nn.Module, spec: ArchSpec, channels: torch.Tensor,
            kept: dict[str, list[Optional[torch.Tensor]]]) -> nn.Module:
    """Build `spec` and fill it with `model`'s tensors, keeping `channels` wherever a dim shrank.

    Family-agnostic, like `_split`: a tensor whose dim 0 shrank carries the unit's channels as
    outputs (producer convs, BatchNorm, depthwise convs), one whose dim 1 shrank reads them.
    `kept` accumulates, per tensor and dim, which original indices survive (for optimizer state).
    """
    param = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        new = build(spec)
    new.to(device=param.device, dtype=param.dtype)
    new.train(model.training)
    new._split_log = []
    old_state = model.state_dict()
    for name, tensor in new.state_dict().items():
        value, dims = old_state[name], kept.setdefault(name, [None, None])
        for d in range(min(2, value.dim())):
            if tensor.shape[d] != value.shape[d]:
                value = value.index_select(d, channels.to(value.device))
                dims[d] = channels if dims[d] is None else dims[d][channels]
        tensor.copy_(value)
    return new


def _pruned_optimizer(old_model: nn.Module, old_opt: torch.optim.Optimizer, new_model: nn.Module,
                      kept: dict[str, list[Optional[torch.Tensor]]]) -> torch.optim.Optimizer:
    """An optimizer like `old_opt` over `new_model`, its per-parameter state cut like the weights."""
    names = {id(p): n for n, p in old_model.named_parameters()}
    new_params = dict(new_model.named_parameters())
    groups = []
    for group in old_opt.param_groups:
        missing = [p for p in group["params"] if id(p) not in names]
        if missing:
            raise ValueError("the optimizer holds tensors that are not parameters of the model being pruned")
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [new_params[names[id(p)]] for p in group["params"]]})
    new_opt = type(old_opt)(groups, **old_opt.defaults)
    old_params = dict(old_model.named_parameters())
    for name, p in new_params.items():
        old_p = old_params[name]
        if old_p not in old_opt.state:
            continue
        state = {}
        for key, value in old_opt.state[old_p].items():
            if torch.is_tensor(value) and value.dim() > 0 and value.shape == old_p.shape:
                for d, index in enumerate(kept[name]):
                    if index is not None:
                        value = value.index_select(d, index.to(value.device))
                state[key] = value.clone()
            else:
                state[key] = value.clone() if torch.is_tensor(value) else value
        new_opt.state[p] = state
    return new_opt
