"""Prune along the DessiLBI path: rank filters by when Gamma selected them, cut to a budget, fine-tune.

Growing and pruning are the two directions of one path. DessiLBI's Gamma starts at zero and
switches filters on one by one, the important ones first (an inverse scale space). A network that
is too big is trained with DessiLBI for a few epochs while every filter's selection time is
recorded; filters are then ranked across all layers by that time (earliest first; ties, and
filters never selected, by Gamma's and then Z's norm), the earliest-selected ones that fit the
budget are kept, the rest are removed physically (`grow.morph.prune`), and the smaller network is
fine-tuned with the dense recipe and evaluated once on the test split.

With `ticket=True` it is the paper's early-stopped winning ticket instead: the structure Gamma has
selected after a few epochs (the support of Gamma) is retrained from the weights it started with
(rewound) or from scratch, and the epoch it was taken at is reported.

The run folder is grow's: model.json + model.safetensors, history.json, config.json and plots.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import search_spaces
from grow import morph
from grow.controller import GrowConfig, _Run, load_start_model
from grow.cost import count_macs, count_params
from grow.data import Batches
from grow.errors import GrowError
from grow.export import read_model_json, save_model
from grow.fileio import write_json
from grow.policy import Budget, selection_ratios
from grow.report import NullReporter, Reporter, human
from grow.spec import ArchSpec, SpecError, build
from grow.train import evaluate


@dataclass
class PruneConfig:
    """Everything a pruning run depends on; saved as config.json in the run folder.

    The network to prune is `from_model` (a model.json or run folder, weights included) or a
    family's classic member (`space` + `arch`, e.g. resnet / resnet56, freshly initialised).
    Defaults, and why:
    - epochs 10 of DessiLBI, then finetune_epochs 10 of the dense recipe (grow's fine-tune).
    - path 1.5: Gamma's path advances lr * steps / mu = 1.5 over the DessiLBI epochs (unless mu is
      given). The pull of W towards Gamma grows with the path; on a trained ResNet-20 (CIFAR-10
      pictures, 4 epochs) a path of 3 left the network at 43% before the cut and 53.0% after the
      fine-tune, 1.5 at 44% and 57.6% (bench/RESULTS.md). Filters not yet switched on are ranked by
      Z, the path's running total of their weight.
    - ticket_epoch None: the latest epoch whose Gamma support still fits the budget.
    - rank "global": filters of all layers compete on selection time (see `ranking`).
    """

    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    from_model: Optional[str] = None
    space: Optional[str] = None
    arch: Optional[str] = None
    budget_macs: Optional[int] = None
    budget_params: Optional[int] = None
    out: str = "runs/prune"
    epochs: int = 10
    finetune_epochs: int = 10
    ticket: bool = False
    ticket_epoch: Optional[int] = None
    rewind: bool = True
    rank: str = "global"
    path: float = 1.5
    batch_size: int = 128
    lr: float = 0.1
    finetune_lr: Optional[float] = None
    kappa: float = 1.0
    mu: Optional[float] = None
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.1
    train_subset: Optional[int] = None
    augment: str = "auto"
    download: bool = True
    image_size: Optional[int] = None  # None: a --from model's own (square) size, else the set's

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise GrowError on values that cannot work, before any data is read."""
        if self.from_model and (self.space or self.arch):
            raise GrowError("give either --from MODEL_JSON or --space FAMILY --arch MEMBER, not both")
        if not self.from_model and not (self.space and self.arch):
            raise GrowError("say which network to prune: --from MODEL_JSON, or --space FAMILY --arch MEMBER "
                            "(e.g. --space resnet --arch resnet56)")
        if self.space and self.space not in search_spaces.names():
            raise GrowError(f"unknown search space {self.space!r}; choose one of {', '.join(search_spaces.names())}")
        if self.budget_macs is None and self.budget_params is None:
            raise GrowError("give a budget to prune to: --budget-flops and/or --budget-params")
        for name in ("budget_macs", "budget_params"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise GrowError(f"{name.replace('_', ' ')} must be positive, got {value}")
        for name in ("epochs", "batch_size", "lr", "kappa", "path"):
            if not getattr(self, name) > 0:
                raise GrowError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.finetune_epochs < 0:
            raise GrowError(f"finetune-epochs must be 0 or more, got {self.finetune_epochs}")
        if self.mu is not None and not self.mu > 0:
            raise GrowError(f"mu must be positive, got {self.mu}")
        if self.rank not in RANKS:
            raise GrowError(f"rank must be one of {', '.join(RANKS)}, got {self.rank!r}")
        if self.ticket_epoch is not None and not self.ticket:
            raise GrowError("--ticket-epoch needs --ticket")
        if self.ticket_epoch is not None and not 1 <= self.ticket_epoch <= self.epochs:
            raise GrowError(f"ticket-epoch must be between 1 and --epochs {self.epochs}, got {self.ticket_epoch}")

    def run_config(self, family: str) -> GrowConfig:
        """The GrowConfig whose run helpers (data, DessiLBI, fine-tune) this run reuses: the DessiLBI
        phase is one round of `epochs` epochs, the fine-tune grow's."""
        values = {k: v for k, v in self.to_dict().items() if k not in ("space", "arch", "epochs", "path")}
        return GrowConfig.from_dict({**values, "space": family, "epochs_per_round": self.epochs, "max_rounds": 1,
                                     "path_per_round": self.path, "round_steps": 0})  # whole epochs


@dataclass
class PruneResult:
    out: Path
    model: nn.Module
    history: dict
    test_accuracy: float
    unpruned_test_accuracy: float
    ticket_epoch: Optional[int]


class SelectionRecorder:
    """Per channel of every unit: the optimizer step since which Gamma has selected it.

    A coupled unit (a residual stream, written by several convs) counts a channel as selected once
    at least half of its producers' Gamma groups for it are non-zero. (The growth policy's "any of
    them" would rank every stream channel ahead of single layers: with many writers one is soon on.)
    A channel that drops out again loses its time. Hooked on the optimizer's step: the resolution
    is one step.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.units = morph.units(model)
        self.weights = {u.name: [model.get_submodule(p).weight for p in u.producers] for u in self.units}
        self.since = {u.name: torch.full((u.width,), -1, dtype=torch.long) for u in self.units}
        self.step = 0
        self.snapshots: list[dict] = []  # one per finished epoch, see snapshot()
        self._handle = optimizer.register_step_post_hook(lambda *_: self._after_step())

    def close(self) -> None:
        self._handle.remove()

    @torch.no_grad()
    def _filter_norms(self, key: str) -> dict[str, torch.Tensor]:
        """Per unit: [producers, channels] l2 norms of the optimizer's `key` ("gamma" or "z")."""
        return {name: torch.stack([self._state(w, key).flatten(1).double().norm(dim=1).cpu() for w in weights])
                for name, weights in self.weights.items()}

    def norms(self, key: str) -> dict[str, torch.Tensor]:
        """Per unit and channel, the root-mean-square over producers of `key`'s filter norms."""
        return {name: n.square().mean(0).sqrt().float() for name, n in self._filter_norms(key).items()}

    def _state(self, w: torch.Tensor, key: str) -> torch.Tensor:
        return self.optimizer.state.get(w, {}).get(key, torch.zeros_like(w))

    def support(self) -> dict[str, torch.Tensor]:
        """Per unit, which channels Gamma selects now: in at least half of the unit's producers."""
        return {name: 2 * (n > 0).sum(0) >= n.shape[0] for name, n in self._filter_norms("gamma").items()}

    def _after_step(self) -> None:
        self.step += 1
        for name, on in self.support().items():
            since = self.since[name]
            since[~on] = -1
            since[on & (since < 0)] = self.step

    def snapshot(self, epoch: int) -> dict:
        """Record the state of selection at the end of `epoch`: support, times and norms."""
        snap = {"epoch": epoch, "step": self.step, "since": {k: v.clone() for k, v in self.since.items()},
                "gamma": self.norms("gamma"), "z": self.norms("z")}
        self.snapshots.append(snap)
        return snap


RANKS = ("global", "layer")


def ranking(snap: dict, rank: str = "global") -> list[tuple[str, int]]:
    """Every (unit, channel), earliest-selected first; ties and never-selected channels by the norm
    of Gamma, then of Z (the one closest to switching on first).

    rank "global" compares selection times across layers. "layer" keeps each layer's own order but
    interleaves the layers by the share of their width reached (the i-th of a layer's w channels
    comes at (i + 1) / w), so a budget cuts every layer by about the same share: the paper's
    per-layer pruning by the Gamma order.
    """
    items = []
    for name, since in snap["since"].items():
        for c in range(len(since)):
            t = int(since[c])
            items.append(((t if t >= 0 else math.inf), -float(snap["gamma"][name][c]), -float(snap["z"][name][c]),
                          name, c))
    items.sort(key=lambda item: item[:3])
    order = [(name, c) for *_, name, c in items]
    if rank == "layer":
        position: dict[str, int] = {}
        share = {}
        for name, c in order:
            position[name] = position.get(name, 0) + 1
            share[(name, c)] = position[name] / len(snap["since"][name])
        order.sort(key=lambda item: share[item])  # stable: equal shares keep the global order
    return order


def keep_within(spec: ArchSpec, order: list[tuple[str, int]], budget: Budget,
                allowed: Optional[set[tuple[str, int]]] = None) -> dict[str, list[int]]:
    """Greedy over `order`: every unit keeps its first channel (a network needs one in each), then
    each further channel in `allowed` (default: all) that still fits the budget, checked exactly.

    A channel that does not fit never will (the network only grows, so adding a channel only gets
    dearer): the result is maximal, no channel left out could be added back within the budget.
    """
    family = search_spaces.get(spec.family)
    keep: dict[str, list[int]] = {}
    for name, c in order:
        if name not in keep and (allowed is None or (name, c) in allowed):
            keep[name] = [c]
    for name, c in order:  # units with nothing allowed keep their best-ranked channel
        keep.setdefault(name, [c])
    widths = {name: len(channels) for name, channels in keep.items()}
    if not within(budget, family.widen_spec(spec, widths)):
        smallest = family.widen_spec(spec, widths)
        raise GrowError(f"the budget is below even one filter per layer ({count_macs(smallest):,} MACs, "
                        f"{count_params(smallest):,} parameters); raise it")
    full: set[str] = set()
    for name, c in order:
        if name in full or c in keep[name] or (allowed is not None and (name, c) not in allowed):
            continue
        widths[name] += 1
        if within(budget, family.widen_spec(spec, widths)):
            keep[name].append(c)
        else:
            widths[name] -= 1
            full.add(name)
    return {name: sorted(channels) for name, channels in keep.items()}


def within(budget: Budget, spec: ArchSpec) -> bool:
    """Whether the architecture `spec` fits `budget` (exact closed-form costs; nothing is built)."""
    return ((budget.macs is None or count_macs(spec) <= budget.macs)
            and (budget.params is None or count_params(spec) <= budget.params))


def _support_keep(snap: dict) -> set[tuple[str, int]]:
    return {(name, c) for name, since in snap["since"].items() for c in range(len(since)) if since[c] >= 0}


def _source(config: PruneConfig, run: Optional[_Run]) -> tuple[Optional[nn.Module], ArchSpec, dict]:
    """The network to prune (None before the data is read, for a classic member), its spec, and what
    history records about it."""
    if config.from_model:
        record = read_model_json(config.from_model)
        try:
            spec = ArchSpec.from_dict(record["arch"])
        except SpecError as err:
            raise SpecError(f"{record['_path']}: {err}") from None
        model = load_start_model(config.from_model, run.splits.info) if run else None
        return model, spec, {"from": str(config.from_model), "metrics": record.get("metrics", {})}
    if run is None:
        return None, None, {}
    info = run.splits.info
    spec = search_spaces.get(config.space).classic(config.arch, info.input_shape, info.num_classes,
                                                   normalization={"mean": list(info.mean), "std": list(info.std)})
    torch.manual_seed(config.seed)
    return build(spec), spec, {"from": f"{config.space}/{config.arch}", "metrics": {}}


def _check_prunable(spec: ArchSpec, budget: Budget, where: str) -> None:
    if within(budget, spec):
        raise GrowError(f"{where} needs {count_macs(spec):,} MACs and {count_params(spec):,} parameters, "
                        f"already within the budget: nothing to prune (give a smaller budget)")


def prune_network(config: PruneConfig, reporter: Optional[Reporter] = None) -> PruneResult:
    """Prune a network to `config`'s budget along the DessiLBI path (or take an early ticket), fine-tune
    or retrain it, evaluate it once on the test split and export it to `config.out`.

    Raises GrowError (one clear sentence) for problems the user can fix.
    """
    config.check()
    budget = Budget(config.budget_macs, config.budget_params)
    run, model, source = _open(config, reporter or NullReporter(), budget)
    initial = copy.deepcopy(model)  # what a rewound ticket restarts from
    optimizer = run.make_optimizer(model)
    recorder = SelectionRecorder(model, optimizer)
    try:
        snap = _train_path(config, run, model, optimizer, recorder, budget)
    finally:
        recorder.close()
    keep = keep_within(model.spec, ranking(snap, config.rank), budget, _support_keep(snap) if config.ticket else None)
    test_batches = Batches(run.splits.test, 512, info=run.splits.info, train=False, device=run.device)
    unpruned_loss, unpruned_acc = evaluate(model, test_batches, precision=run.precision)
    run.history["unpruned_test"] = {"loss": unpruned_loss, "accuracy": unpruned_acc, "epoch": snap["epoch"]}
    pruned = _ticket_start(config, initial, keep) if config.ticket else morph.prune(model, keep)
    _record_cut(run, config, snap, keep, model, pruned)
    run.reporter.message(_cut_text(run.history["cut"]))
    pruned = run.finetune(pruned, epochs=config.finetune_epochs)
    test_loss, test_acc = evaluate(pruned, test_batches, precision=run.precision)
    run.history["test"] = {"loss": test_loss, "accuracy": test_acc}
    return _export(config, run, pruned, source, snap)


def _open(config: PruneConfig, reporter: Reporter, budget: Budget) -> tuple[_Run, nn.Module, dict]:
    """Check the source against the budget (a model file before any data is read), read the data,
    load or build the network, and start the run folder and its history."""
    out = Path(config.out)
    if (out / "model.json").exists():
        raise GrowError(f"{out} already holds a model; choose another --out")
    _, spec, _ = _source(config, None)
    if spec is not None:
        _check_prunable(spec, budget, str(config.from_model))
        height, width = spec.input_shape[1:]
        if config.image_size is None and height == width:  # read the set at the size the model was grown at
            config = dataclasses.replace(config, image_size=height)
    run = _Run(config.run_config(spec.family if spec is not None else config.space), reporter)
    model, spec, source = _source(config, run)
    _check_prunable(spec, budget, source["from"])
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", config.to_dict())
    run.history.update(config=config.to_dict(), source={**source, "spec": spec.to_dict(), "macs": count_macs(spec),
                                                         "params": count_params(spec)})
    reporter.message(f"prune {source['from']} ({human(count_macs(spec))} MACs, {human(count_params(spec))} params) "
                     f"on {run.splits.info.name} to {_budget_text(budget)}, device {run.device}, out {out}"
                     + (" -- early ticket" if config.ticket else ""))
    return run, model.to(run.device), source


def _export(config: PruneConfig, run: _Run, pruned: nn.Module, source: dict, snap: dict) -> PruneResult:
    """Write model.json + weights, history.json and the plots; report; return the result."""
    out, test, unpruned = Path(config.out), run.history["test"], run.history["unpruned_test"]
    ticket_epoch = snap["epoch"] if config.ticket else None
    metrics = {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
               "unpruned_test_accuracy": unpruned["accuracy"],
               "source_test_accuracy": source["metrics"].get("test_accuracy"), "epochs": run.epoch,
               "dataset": run.splits.info.name, "method": "ticket" if config.ticket else "gamma",
               "ticket_epoch": ticket_epoch}
    cut = run.history["cut"]
    pruned_info = {"from": source["from"], "macs_before": cut["macs_before"], "params_before": cut["params_before"],
                   "cut_epoch": snap["epoch"]}
    model_json = save_model(pruned.cpu(), out, metrics=metrics,
                            extra={"classes": list(run.splits.info.classes), "pruned": pruned_info})
    run.history["final"] = {"macs": count_macs(pruned.spec), "params": count_params(pruned.spec),
                            "model_json": str(model_json), "spec": pruned.spec.to_dict(), **metrics}
    write_json(out / "history.json", run.history)
    _plot(out, run.history, run.reporter)
    source_acc = metrics["source_test_accuracy"]
    run.reporter.message(
        f"test accuracy {test['accuracy']:.4f} (unpruned network at the cut: {unpruned['accuracy']:.4f}"
        + (f"; source model: {source_acc:.4f}" if source_acc is not None else "")
        + f") | {human(count_macs(pruned.spec))} MACs, {human(count_params(pruned.spec))} params"
        + (f" | ticket taken at epoch {ticket_epoch}" if config.ticket else "") + f" | model: {model_json}")
    return PruneResult(out, pruned, run.history, test["accuracy"], unpruned["accuracy"], ticket_epoch)


def _budget_text(budget: Budget) -> str:
    return ", ".join(b for b in (budget.macs and f"{human(budget.macs)} MACs",
                                 budget.params and f"{human(budget.params)} params") if b)


def _train_path(config: PruneConfig, run: _Run, model: nn.Module, optimizer, recorder: SelectionRecorder,
                budget: Budget) -> dict:
    """DessiLBI epochs; returns the snapshot the cut is taken from. A ticket stops early: at
    `ticket_epoch`, or (automatic) once the support outgrows the budget, keeping the epoch before."""
    spec, family = model.spec, search_spaces.get(model.spec.family)
    run.reporter.phase("DessiLBI path", config.epochs)
    epochs: list[dict] = []
    phase = {"round": 1, "spec": spec.to_dict(), "macs": count_macs(spec), "params": count_params(spec),
             "widths": {u.name: u.width for u in morph.units(model)}, "epochs": epochs, "mu": run.mu(),
             "actions": [], "notes": []}
    run.history["rounds"] = [phase]  # the phase is one grow round: the fine-tune counts on it
    snap = None
    for e in range(1, config.epochs + 1):
        path: list = []
        record = run.train_one_epoch(model, optimizer, f"DessiLBI epoch {e}/{config.epochs}", path=path)
        record["selection_ratio"] = selection_ratios(model, optimizer)
        record["selection_path"] = path
        epochs.append(record)
        run.reporter.epoch_end(record)
        previous, snap = snap, recorder.snapshot(e)
        phase.update(val_accuracy=record["val_accuracy"], train_accuracy=record["train_accuracy"])
        if config.ticket and config.ticket_epoch == e:
            break
        if config.ticket and config.ticket_epoch is None:
            support = {name: int((since >= 0).sum()) for name, since in snap["since"].items()}
            if not within(budget, family.widen_spec(spec, {k: max(1, v) for k, v in support.items()})):
                phase["stop"] = f"the Gamma support of epoch {e} exceeds the budget"
                snap = previous or snap
                break
    run.history["support"] = [{"epoch": s["epoch"], "step": s["step"],
                               "channels": {k: (v >= 0).nonzero().flatten().tolist() for k, v in s["since"].items()}}
                              for s in recorder.snapshots]
    return snap


def _ticket_start(config: PruneConfig, initial: nn.Module, keep: dict[str, list[int]]) -> nn.Module:
    """The ticket's structure with the weights the path started from (rewound), or fresh ones."""
    rewound = morph.prune(initial, keep)
    if config.rewind:
        return rewound
    torch.manual_seed(config.seed)
    return build(rewound.spec).to(next(initial.parameters()).device)


def _record_cut(run: _Run, config: PruneConfig, snap: dict, keep: dict, model: nn.Module, pruned: nn.Module) -> None:
    """history: every filter's selection time and norms, and the cut (what was kept, costs, widths)."""
    steps_per_epoch = max(1, len(run.train_batches))
    run.history["selection"] = {
        name: {"since_step": [int(t) if t >= 0 else None for t in since],
               "since_epoch": [round(int(t) / steps_per_epoch, 4) if t >= 0 else None for t in since],
               "gamma_norm": snap["gamma"][name].tolist(), "z_norm": snap["z"][name].tolist()}
        for name, since in snap["since"].items()}
    val_loss, val_acc = (evaluate(pruned, run.val_batches, precision=run.precision) if len(run.splits.val)
                         else (None, None))
    run.history["cut"] = {
        "method": "ticket" if config.ticket else "gamma", "epoch": snap["epoch"], "step": snap["step"],
        "rewind": config.rewind if config.ticket else None, "keep": keep,
        "rule": "earliest-selected filters first (ties and unselected: larger Gamma, then Z norm), "
                + ("each layer by the same share, " if config.rank == "layer" else "across all layers, ")
                + "greedy within the budget" + ("; only the Gamma support of the ticket epoch" if config.ticket else ""),
        "widths_before": {u.name: u.width for u in morph.units(model)},
        "widths_after": {u.name: u.width for u in morph.units(pruned)},
        "macs_before": count_macs(model.spec), "macs_after": count_macs(pruned.spec),
        "params_before": count_params(model.spec), "params_after": count_params(pruned.spec),
        "val_loss_after_cut": val_loss, "val_accuracy_after_cut": val_acc,
    }


def _cut_text(cut: dict) -> str:
    widths = ", ".join(f"{name} {cut['widths_before'][name]}->{w}" for name, w in cut["widths_after"].items())
    what = f"ticket taken at epoch {cut['epoch']}" if cut["method"] == "ticket" else f"cut after epoch {cut['epoch']}"
    acc = cut["val_accuracy_after_cut"]
    return (f"{what}: {human(cut['macs_before'])} -> {human(cut['macs_after'])} MACs, "
            f"{human(cut['params_before'])} -> {human(cut['params_after'])} params"
            + (f", val acc right after the cut {acc:.3f}" if acc is not None and cut["method"] == "gamma" else "")
            + f"\n  widths: {widths}")


def _plot(out: Path, history: dict[str, Any], reporter: Reporter) -> None:
    try:
        from grow.plots import plot_prune
        plot_prune(history, out)
    except Exception as err:  # a plot is a convenience: never lose a finished run over it
        reporter.message(f"plots skipped: {err}")
