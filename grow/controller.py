"""The growth loop: train a round with DessiLBI, read Gamma, grow, repeat; then fine-tune and export.

Every finished round leaves a checkpoint (the grown model and the optimizer state it starts the
next round with, plus the history so far), written atomically, so a run killed at any moment
resumes from its last finished round with `resume=True`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import search_spaces
from grow import checkpoints, distributed, guards, morph, rundir
from grow.cost import count_macs, count_params
from grow.data import Batches, FirstBatches, Splits, load_dataset
from grow.errors import GrowError
from grow.export import load_model, read_model_json, save_model, save_weights
from grow.fileio import write_json
from grow.optim import DessiLBI
from grow.baselines import classic_seed, small_seed
from grow.recipe import Recipe, merged, weight_decay_for
from grow.policy import ORDERS, Budget, fill_budget, lbi_param_groups, paced, plan_growth, selection_ratios
from grow.report import NullReporter, Reporter
from grow.spec import build
from grow.train import PRECISIONS, Accelerated, Diverged, evaluate, grad_scaler, resolve_precision, train_epoch


@dataclass
class GrowConfig:
    """Everything a growth run depends on; saved as config.json in the run folder.

    Defaults, and why:
    - kappa 0.1 with lr 1.0 in the rounds: DessiLBI's weight step is lr*kappa = 0.1 (the usual SGD
      step), and the pull of W towards the sparse Gamma, lr*kappa/mu per step, is a tenth of what
      the paper's kappa 1 gives. With few steps per round (58 on 5,170 CIFAR-10 pictures) a strong
      pull holds a round's training back: kappa 0.5 was worth +1.4 and +3.0 points over kappa 1,
      and kappa 0.1 over 0.5 +3.0 for mobilenet (its budget then fills in round 4 instead of 8-9),
      +0.3 for vgg at 5M MACs, +0.5 at 20M, +0.1 on Fashion-MNIST and -0.4 (within the noise) for
      resnet, three seeds each (bench/RESULTS.md). Z's speed, lr/mu, is set by the path speed and
      does not change.
    - finetune_lr 0.2: a one-cycle fine-tune peaking at twice the lr that suits training from
      scratch. At 0.1 the warm-started network stayed 2.0 points below its own shape trained from
      scratch on the CIFAR-10 pictures, at 0.2 0.8 points; from scratch, 0.2 was slightly worse
      than 0.1 (bench/RESULTS.md). Momentum 0.9 and batch 128: the usual CIFAR SGD recipe.
    - weight_decay None: chosen from the number of labelled pictures (grow.recipe.weight_decay_for):
      5e-4, the usual CIFAR value, up to 10,000 pictures, falling as one over their number to 1e-4 at
      50,000 and more (full CIFAR-10, Fashion-MNIST), in the rounds and the fine-tune alike;
      bench/suite.py gives its fixed networks the same value. On the 4,170 CIFAR-10 pictures 1e-4 halved
      growth's lead at 20M MACs; on Fashion-MNIST it was worth +0.19 points to the grown network at 3M.
    - finetune_warmup 0.15: the fine-tune's one-cycle rises to its peak over 15% of its steps, as
      the networks trained from scratch do. A shorter warm-up for an already-trained network
      looked better over five seeds at 5M MACs (5%: 72.08 against 71.36), but over ten seeds it
      was even (71.13 against 71.25; paired -0.12, 95% CI -1.02 to +0.78), and at 20M too (73.83
      against 74.04; bench/RESULTS.md). So one recipe serves every network; --finetune-warmup is
      there for those who want to try.
    - order "cost": asked-for growth steps cheapest first, by their share of the budget (MACs under a
      MAC budget, parameters under a parameter budget; grow.policy.plan_growth), except that a new
      stage the cheaper steps would leave no room for goes first while it takes at most half the
      budget: under tight budgets (2.5M MACs and less on the CIFAR-10 pictures) it was otherwise never
      added, and keeping it was worth +1.35 points at 2M and +1.53 at 2.5M, six seeds each. Ranked by
      MACs under a 300K-parameter budget, growth spent the budget on low-resolution filters and was
      1.1 points below the seed topology scaled (bench/RESULTS.md, twenty-first wave).
    - extend_stages: a saturated last stage may be followed by a new stage at half its resolution,
      the cheapest capacity there is under a MAC budget. It was worth +1.6 points over three seeds
      at 5M MACs on the CIFAR-10 pictures, and the shape growth then found beat the seed's topology
      scaled to the budget by 1.3 points when both trained from scratch.
    - deepen "with-widen" and deepen_per_round 1: a fully saturated stage deepens in the round its
      layers widen, but only one stage per round, the cheapest. With every stage deepening at once,
      a 20M budget went to four deepenings in round 2 and the grown network lost 5.7 points to the one
      that deepens one stage a round (RESULTS.md). "after-widen" (deepen only once the widened layers
      saturate again) took until round 5-6 to fill the budget and lost 2 points.
    - fill_by None (= half of max_rounds, rounded up): after that round, growth spends what is left
      of the budget at once, every layer widened by one factor (grow.policy.fill_budget), and
      stops. Growth that fills the budget slowly otherwise leaves the final network too few epochs
      at full size: mobilenet filled its budget in round 8-9 of 10 and ended underfit, 3.7-4.6
      points below its own shape trained from scratch; with the deadline it gained 1.6 points over
      three seeds on the CIFAR-10 pictures (RESULTS.md, at kappa 0.5). With kappa 0.1 every measured
      run had its budget full by then, so the deadline guards slow growers and changes nothing else.
    - round_steps 64: a round trains at most 64 batches, however many pictures an epoch holds; the
      fine-tune trains the batches a round left. A round exists to move Gamma's path (mu is set
      from the round's steps, so the path advances the same whatever its length) and to let the
      grown layers settle, and growth was measured to pay with rounds of 58 steps (2 epochs of
      the 4,170 CIFAR-10 pictures, which 64 leaves untouched). Where an epoch is long, whole-epoch
      rounds only keep the network small for longer: on Fashion-MNIST (422 batches an epoch, 3M
      MACs, 8 epochs) the same shapes grew with short rounds and scored +0.28 (140 steps), +0.38
      (70) and +0.29 (64) points over whole-epoch rounds, five seeds each (bench/RESULTS.md).
      prune keeps whole epochs, and so does a run resumed from before this option existed.
    - mu None: chosen from the round length so that Gamma's path advances the same
      `path_per_round` in every round, whatever the dataset size (see DESIGN.md: the time at
      which filters switch on scales with mu/lr and the number of steps, not with epochs).
    - tau 0.9: a layer whose filters are 90% switched on is saturated.
    - widen_ratio 0.5 with at least widen_min 4 filters: a saturated layer grows by half.
    - widen_init "fresh": a new filter gets random incoming weights and zero outgoing ones. Copies
      of old filters ("split", Net2Net, the default until 2026-11-26) never fully part: in grown
      20M networks 56-74% of the last stage's filters still had a near-twin (cosine > 0.9) after
      the fine-tune, a third or more of its width wasted. Over 19-20 paired seeds on the CIFAR-10
      pictures fresh filters won +1.17 points at 5M MACs and +2.13 at 20M (95% CIs +0.67..+1.66
      and +1.43..+2.82), +0.89 for resnet and +2.75 for mobilenet at 5M (ten seeds; RESULTS.md).
    - label_smoothing 0.1 and a one-cycle fine-tune (grow.recipe): the recipe the baselines of
      bench/suite.py train with too (at their own best peak lr, 0.1).
    - finetune_on_val: once growth has decided, the validation split has done its job; the
      fine-tune trains on it as well, as a fixed network would train on every labelled image.
    """

    dataset: str = "cifar10"
    data_dir: Optional[str] = None
    space: str = "vgg"
    budget_macs: Optional[int] = None
    budget_params: Optional[int] = None
    out: str = "runs/grow"
    epochs_per_round: int = 2
    round_steps: int = 64
    max_rounds: int = 8
    finetune_epochs: int = 10
    batch_size: int = 128
    lr: float = 1.0
    finetune_lr: Optional[float] = 0.2
    finetune_warmup: float = 0.15
    kappa: float = 0.1
    mu: Optional[float] = None
    path_per_round: float = 2.5
    momentum: float = 0.9
    weight_decay: Optional[float] = None
    tau: float = 0.9
    widen_ratio: float = 0.5
    widen_min: int = 4
    widen_init: str = "fresh"
    label_smoothing: float = 0.1
    finetune_on_val: bool = True
    seed_shape: str = "small"
    seed_fraction: float = 0.15
    seed_share: float = 1 / 3
    order: str = "cost"
    deepen: str = "with-widen"
    pace_rounds: int = 0
    fill_by: Optional[int] = None
    extend_stages: bool = True
    deepen_per_round: int = 1
    seed: int = 0
    device: str = "auto"
    val_fraction: float = 0.1
    train_subset: Optional[int] = None
    augment: str = "auto"
    download: bool = True
    precision: str = "auto"  # autocast bf16 / fp16 / fp32; auto: bf16 on CUDA GPUs (fp16 on old ones), fp32 on CPU
    compile: bool = False  # torch.compile the network, again after every growth step
    channels_last: bool = True  # NHWC layout: 1.8x faster on CPU (bench/RESULTS.md), what tensor cores want
    from_model: Optional[str] = None  # a model.json whose network (and weights) replace the family seed
    stream: str = "auto"  # folder datasets: stream from disk when too large for memory (grow.stream), on, off
    image_size: Optional[int] = None  # pictures are read (folders) or resized to this a side (imagenet: 224)
    data_workers: Optional[int] = None  # DataLoader processes decoding streamed pictures; None: from the cores

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def weight_decay_for(self, pictures: int) -> float:
        """--weight-decay, or by default the one for `pictures` labelled pictures (see `weight_decay`)."""
        return self.weight_decay if self.weight_decay is not None else weight_decay_for(pictures)

    def recipe(self, pictures: int) -> Recipe:
        """The dense recipe of the fine-tune on `pictures` labelled pictures; bench/suite.py trains
        its fixed networks with it too."""
        lr = self.finetune_lr if self.finetune_lr is not None else self.lr
        return Recipe(lr=lr, momentum=self.momentum, weight_decay=self.weight_decay_for(pictures),
                      label_smoothing=self.label_smoothing, warmup=self.finetune_warmup)

    def last_growth_round(self) -> int:
        """The round after which growth spends what is left of the budget and stops (0: never):
        --fill-by, or by default the middle of the rounds (see `fill_by` above)."""
        return math.ceil(self.max_rounds / 2) if self.fill_by is None else self.fill_by

    def policy_options(self) -> dict:
        """The keyword arguments of grow.policy.plan_growth this config sets (a run adds its generator
        and, for --deepen after-widen, the units widened so far)."""
        return {"tau": self.tau, "widen_ratio": self.widen_ratio, "widen_min": self.widen_min,
                "widen_init": self.widen_init, "order": self.order, "extend_stages": self.extend_stages,
                "max_deepen": self.deepen_per_round or None}

    def total_epochs(self) -> int:
        return self.max_rounds * self.epochs_per_round + self.finetune_epochs

    def augments(self) -> bool:
        """Random crops and flips: "on", "off", or "auto" = on for runs of at least AUGMENT_FROM
        epochs. A small network trained for a few epochs underfits (its training accuracy, even
        augmented, stays at the validation accuracy), and augmentation then only slows it down:
        on Fashion-MNIST at 3M MACs and 8 epochs it cost 0.9 points (bench/RESULTS.md)."""
        return self.augment == "on" or (self.augment == "auto" and self.total_epochs() >= AUGMENT_FROM)

    @classmethod
    def from_dict(cls, data: dict) -> "GrowConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check(self) -> None:
        """Raise GrowError on values that cannot work, before any data is read."""
        guards.check_types(self)
        guards.check_budget(self.budget_macs, self.budget_params)
        for name in ("budget_macs", "budget_params"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise GrowError(f"{name.replace('_', ' ')} must be positive, got {value}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise GrowError(f"weight-decay must be 0 or more, got {self.weight_decay}")
        positive = ("epochs_per_round", "max_rounds", "batch_size", "lr", "kappa", "path_per_round", "widen_min")
        for name in positive:
            if not getattr(self, name) > 0:
                raise GrowError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.round_steps < 0:
            raise GrowError(f"round-steps must be 0 (whole epochs) or more, got {self.round_steps}")
        if self.finetune_epochs < 0:
            raise GrowError(f"finetune-epochs must be 0 or more, got {self.finetune_epochs}")
        if not 0 <= self.finetune_warmup < 1:
            raise GrowError(f"finetune-warmup must be in [0, 1), got {self.finetune_warmup}")
        if self.mu is not None and not self.mu > 0:
            raise GrowError(f"mu must be positive, got {self.mu}")
        if self.augment not in ("auto", "on", "off"):
            raise GrowError(f"augment must be auto, on or off, got {self.augment!r}")
        if self.widen_init not in morph.WIDEN_INITS:
            raise GrowError(f"widen-init must be one of {', '.join(morph.WIDEN_INITS)}, got {self.widen_init!r}")
        if self.order not in ORDERS:
            raise GrowError(f"order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.deepen not in ("after-widen", "with-widen"):
            raise GrowError(f"deepen must be after-widen or with-widen, got {self.deepen!r}")
        if self.deepen_per_round < 0:
            raise GrowError(f"deepen-per-round must be 0 (no limit) or more, got {self.deepen_per_round}")
        if self.fill_by is not None and self.fill_by < 0:
            raise GrowError(f"fill-by must be 0 (off) or a round number, got {self.fill_by}")
        if self.pace_rounds < 0:
            raise GrowError(f"pace-rounds must be 0 (no pacing) or more, got {self.pace_rounds}")
        if self.seed_shape not in ("small", "classic"):
            raise GrowError(f"seed-shape must be small or classic, got {self.seed_shape!r}")
        if not 0 < self.seed_fraction < 1:
            raise GrowError(f"seed-fraction must be between 0 and 1, got {self.seed_fraction}")
        if not 0 < self.seed_share <= 1:
            raise GrowError(f"seed-share must be above 0 and at most 1, got {self.seed_share}")
        if not 0 < self.tau <= 1:
            raise GrowError(f"tau must be in (0, 1], got {self.tau}")
        if self.stream not in ("auto", "on", "off"):
            raise GrowError(f"stream must be auto, on or off, got {self.stream!r}")
        if self.image_size is not None and self.image_size < 1:
            raise GrowError(f"image-size must be positive, got {self.image_size}")
        if self.data_workers is not None and self.data_workers < 0:
            raise GrowError(f"data-workers must be 0 or more, got {self.data_workers}")
        if self.precision not in PRECISIONS:
            raise GrowError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.space not in search_spaces.names():
            raise GrowError(f"unknown search space {self.space!r}; choose one of {', '.join(search_spaces.names())}")


@dataclass
class GrowResult:
    out: Path
    model: nn.Module
    history: dict
    test_accuracy: Optional[float]
    status: str


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GrowError(f"device {name!r} is not a torch device (try cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GrowError(f"device {name!r} was asked for but this machine has no usable CUDA GPU")
    return device


AUGMENT_FROM = 15  # epochs; see GrowConfig.augments
PATH_SAMPLES = 8
# "Nothing is saturated" ends growth only once the path has settled: while some layer's selection
# ratio still rises this much per round, its filters are still switching on and the layer may yet
# saturate, so the run trains on (the round's epochs are not lost either way).
SETTLED_RISE = 0.05  # selection-ratio samples per epoch in history.json (the plotted Gamma path)


class _Run:
    """State of one run: the data, the current model and optimizer, and the history."""

    def __init__(self, config: GrowConfig, reporter: Reporter):
        self.config = config
        self.reporter = reporter
        self.out = Path(config.out)
        self.device = distributed.local_device(resolve_device(config.device))
        self.precision = resolve_precision(config.precision, self.device)
        self.scaler = grad_scaler(self.precision, self.device)
        self.accelerated = Accelerated(lambda m: distributed.wrap(m, self.device), compile=config.compile,
                                       precision=self.precision, channels_last=config.channels_last)
        self.budget = Budget(config.budget_macs, config.budget_params)
        self.splits: Splits = load_dataset(
            config.dataset, config.data_dir, val_fraction=config.val_fraction,
            seed=config.seed, train_subset=config.train_subset, download=config.download,
            image_size=config.image_size, stream=config.stream, workers=config.data_workers,
        )
        if self.splits.info.storage == "stream":
            reporter.message(f"{self.splits.info.name}: {self.splits.info.storage_note}")
        guards.check_splits(self.splits, reporter.message, config.batch_size)
        self.pictures = self.splits.labelled()
        self.weight_decay = config.weight_decay_for(self.pictures)
        info = self.splits.info
        self.train_batches = Batches(self.splits.train, config.batch_size, info=info, train=True,
                                     device=self.device, seed=config.seed, augment=config.augments())
        self.val_batches = Batches(self.splits.val, 512, info=info, train=False, device=self.device)
        self.history: dict[str, Any] = {"config": config.to_dict(), "dataset": _dataset_summary(self.splits),
                                        "weight_decay": self.weight_decay, "rounds": [], "finetune": None,
                                        "test": None}
        self.epoch = 0  # epochs trained so far, all phases: seeds the data order

    # --- model and optimizer -------------------------------------------------------------
    def round_epoch_steps(self) -> int:
        """Batches in one epoch of a round: all of them, or a share of --round-steps when that is fewer."""
        c, full = self.config, len(self.train_batches)
        return min(full, math.ceil(c.round_steps / c.epochs_per_round)) if c.round_steps else full

    def round_batches(self):
        steps = self.round_epoch_steps()
        return self.train_batches if steps == len(self.train_batches) else FirstBatches(self.train_batches, steps)

    def mu(self) -> float:
        if self.config.mu is not None:
            return self.config.mu
        steps = self.round_epoch_steps() * self.config.epochs_per_round
        return self.config.lr * steps / self.config.path_per_round

    def make_optimizer(self, model: nn.Module) -> DessiLBI:
        c = self.config
        return DessiLBI(lbi_param_groups(model), lr=c.lr, kappa=c.kappa, mu=self.mu(),
                        momentum=c.momentum, weight_decay=self.weight_decay)

    def seed_model(self) -> nn.Module:
        info = self.splits.info
        if self.config.from_model:  # continue growing a network the user already has
            model = load_start_model(self.config.from_model, info)
            if not self.budget.fits(model):
                raise GrowError(f"{self.config.from_model} already needs {count_macs(model.spec):,} MACs and "
                                f"{count_params(model.spec):,} parameters, above the budget; raise the budget")
            return model.to(self.device)
        normalization = {"mean": list(info.mean), "std": list(info.std)}
        if self.config.seed_shape == "classic" and (self.budget.macs or self.budget.params):
            spec = classic_seed(self.config.space, info.input_shape, info.num_classes, self.budget,
                                self.config.seed_fraction, normalization)
        else:
            spec = small_seed(self.config.space, info.input_shape, info.num_classes, self.budget,
                              self.config.seed_share, normalization)
        torch.manual_seed(self.config.seed)
        model = build(spec)
        if not self.budget.fits(model):
            raise GrowError(
                f"the seed network of {self.config.space!r} already needs {count_macs(spec):,} MACs and "
                f"{count_params(spec):,} parameters, above the budget; raise the budget"
            )
        return model.to(self.device)

    # --- checkpoints ---------------------------------------------------------------------
    def checkpoint(self, model: nn.Module, optimizer: DessiLBI, next_round: int, growth_done: bool) -> None:
        """Save the state the next round starts from (grow.checkpoints: whole or not at all, with checksums)."""
        checkpoints.write_round(self.out, next_round, growth_done, self.epoch, spec_json=model.spec.to_json(),
                                save_weights=lambda path: save_weights(model, path),
                                optimizer_state=optimizer.state_dict(), history=self.history)
        write_json(self.out / "history.json", self.history)

    def restore(self) -> tuple[nn.Module, DessiLBI, int, bool]:
        """The newest intact round checkpoint; a damaged one is named and an earlier round used."""
        def load(state: checkpoints.RoundState) -> tuple[nn.Module, DessiLBI]:
            model = build(state.spec)
            model.load_state_dict(state.weights)
            model.to(self.device)
            optimizer = self.make_optimizer(model)
            optimizer.load_state_dict(state.optimizer)
            return model, optimizer

        (model, optimizer), state = checkpoints.restore(self.out, load, self.reporter.message)
        self.history, self.epoch = state.history, state.epoch
        return model, optimizer, state.next_round, state.growth_done

    # --- phases --------------------------------------------------------------------------
    def train_one_epoch(self, model, optimizer, label, scheduler=None, path=None, batches=None, validate=True):
        """One epoch and its validation; with `path` (a list), DessiLBI's selection ratios are
        sampled about PATH_SAMPLES times during the epoch into it, as (epoch time, ratios)."""
        batches = batches or self.train_batches
        batches.set_epoch(self.epoch)
        total = len(batches)
        self.reporter.epoch_start(label, total)
        next_sample = [0]

        def on_batch(done, total, loss, accuracy):
            self.reporter.batch(done, total, loss, accuracy)
            if path is not None and done >= next_sample[0]:
                path.append([round(self.epoch + done / total, 4), selection_ratios(model, optimizer)])
                next_sample[0] = done + total / PATH_SAMPLES

        try:
            net = self.accelerated(model, (batches.batch_size // batches.world_size, *self.splits.info.input_shape))
            stats = train_epoch(net, optimizer, batches, scheduler=scheduler, on_batch=on_batch,
                                label_smoothing=self.config.label_smoothing, precision=self.precision,
                                channels_last=self.config.channels_last,
                                scaler=self.scaler, reduce=distributed.all_reduce_sum)
        except Diverged as err:
            raise GrowError(
                f"training diverged in {label}: {err}; the last finished round is kept in "
                f"{self.out} -- lower --lr (now {optimizer.param_groups[0]['lr']:g}) and start again"
            ) from None
        self.epoch += 1
        val_loss, val_acc = evaluate(model, self.val_batches, precision=self.precision) if validate else (None, None)
        record = {"epoch": self.epoch, "train_loss": stats.loss, "train_accuracy": stats.accuracy,
                  "val_loss": val_loss, "val_accuracy": val_acc, "seconds": stats.seconds, "images": stats.images,
                  "images_per_second": stats.images_per_second}
        compile_seconds = self.accelerated.take_compile_seconds()
        if compile_seconds:  # --compile: the time torch.compile took for this network, not in "seconds"
            record["compile_seconds"] = compile_seconds
        return record

    def grow_round(self, model: nn.Module, optimizer: DessiLBI, index: int) -> tuple[nn.Module, DessiLBI, bool]:
        c = self.config
        start = time.perf_counter()
        spec = model.spec
        self.reporter.round_start(index, c.max_rounds, spec, count_macs(spec), count_params(spec))
        before = selection_ratios(model, optimizer)
        epochs = []
        for e in range(c.epochs_per_round):
            path: list = []
            record = self.train_one_epoch(model, optimizer, f"round {index} epoch {e + 1}/{c.epochs_per_round}",
                                          path=path, batches=self.round_batches())
            record["selection_ratio"] = selection_ratios(model, optimizer)
            record["selection_path"] = path
            epochs.append(record)
            self.reporter.epoch_end(record)
        ratios = epochs[-1]["selection_ratio"]
        units = morph.units(model)
        round_record = {
            "round": index, "spec": spec.to_dict(), "macs": count_macs(spec), "params": count_params(spec),
            "widths": {u.name: u.width for u in units}, "epochs": epochs,
            "train_accuracy": epochs[-1]["train_accuracy"], "train_loss": epochs[-1]["train_loss"],
            "val_accuracy": epochs[-1]["val_accuracy"], "val_loss": epochs[-1]["val_loss"],
            "mu": self.mu(), "actions": [], "notes": [],
        }
        done = index >= c.max_rounds
        if done:
            round_record["stop"] = f"reached --max-rounds {c.max_rounds}"
        else:
            generator = torch.Generator().manual_seed(c.seed * 1000 + index)
            budget = paced(self.budget, model, c.pace_rounds - index + 1) if c.pace_rounds else self.budget
            grown, actions, notes = plan_growth(
                model.cpu(), ratios, budget, generator=generator, **c.policy_options(),
                widened=self.widened_units() if c.deepen == "after-widen" else None,
            )
            last = c.last_growth_round()
            if last and index >= last:
                reason = f"round {index} is the last growth round (--fill-by {last})"
                grown, filled = fill_budget(grown, self.budget, ratios, reason=reason, generator=generator,
                                            widen_init=c.widen_init, minimum=c.widen_min)
                actions, done = actions + filled, True
                round_record["stop"] = reason
            model.to(self.device)
            round_record["actions"] = [a.to_dict() for a in actions]
            round_record["notes"] = notes
            rise = max((r - before.get(name, 0.0) for name, r in ratios.items()), default=0.0)
            if actions:
                grown = grown.to(self.device)
                new_optimizer = self.make_optimizer(grown)
                morph.move_optimizer_state(model, optimizer, grown, new_optimizer)
                model, optimizer = grown, new_optimizer
            elif not done and not any(r >= c.tau for r in ratios.values()) and rise >= SETTLED_RISE:
                round_record["notes"].append(
                    f"no layer is saturated yet, but the Gamma path is still moving (a selection ratio rose "
                    f"by {rise:.2f} this round): training on without growing")
            elif not done:
                done = True
                saturated = any(r >= c.tau for r in ratios.values())
                round_record["stop"] = ("no growth step fits the budget" if saturated
                                        else f"no layer is saturated (selection ratio >= tau {c.tau}) and the "
                                             f"Gamma path has settled (no ratio rose by {SETTLED_RISE} this round)")
        round_record["seconds"] = time.perf_counter() - start
        self.history["rounds"].append(round_record)
        self.reporter.round_end(round_record, units)
        return model, optimizer, done

    def widened_units(self) -> set[str]:
        """Units widened in the finished rounds (the deepening rule asks for them)."""
        return {a["target"] for r in self.history["rounds"] for a in r["actions"] if a["kind"] == "widen"}

    def round_steps_trained(self) -> int:
        """Batches the finished rounds trained (each round epoch trains round_epoch_steps() of them)."""
        return sum(len(r["epochs"]) for r in self.history["rounds"]) * self.round_epoch_steps()

    def finetune(self, model: nn.Module, epochs: Optional[int] = None) -> nn.Module:
        """The dense recipe (grow.recipe: Nesterov SGD, one-cycle, label smoothing) on the grown
        network, on train + validation when `finetune_on_val` (then no validation is recorded).

        A growth run trains as many batches in all as a fixed network given the same epochs on the
        same data: `total_epochs()` epochs of the fine-tune's data, less the batches the rounds
        trained (its last epoch may be a part of one). Counting the rounds in their own batches
        matters where they are short or hold the validation split out: on Fashion-MNIST, counting them
        as whole epochs of the training split left the grown network 9% fewer steps than a fixed one
        and cost it 0.26 points (bench/RESULTS.md, tenth wave). `epochs` (grow prune) trains exactly
        that many epochs instead."""
        c = self.config
        recipe = c.recipe(self.pictures)
        batches = self.train_batches
        if c.finetune_on_val and len(self.splits.val):
            batches = Batches(merged(self.splits.train, self.splits.val), c.batch_size, info=self.splits.info,
                              train=True, device=self.device, seed=c.seed, augment=c.augments())
        rounds = self.round_steps_trained()
        if epochs is None:
            steps = max(0, c.total_epochs() * len(batches) - rounds)
        else:
            steps = epochs * len(batches)
        optimizer, scheduler = recipe.optimizer(model, steps)
        total = math.ceil(steps / max(1, len(batches)))
        records = []
        self.reporter.phase("fine-tune", total)
        for e in range(total):
            left = steps - e * len(batches)
            record = self.train_one_epoch(model, optimizer, f"fine-tune epoch {e + 1}/{total}", scheduler=scheduler,
                                          batches=batches if left >= len(batches) else FirstBatches(batches, left),
                                          validate=batches is self.train_batches)
            records.append(record)
            self.reporter.epoch_end(record)
        self.history["finetune"] = {"epochs": records, "lr": recipe.lr, "macs": count_macs(model.spec),
                                    "steps": steps, "round_steps": rounds,
                                    "on_val": batches is not self.train_batches}
        return model


def load_start_model(path: str, info) -> nn.Module:
    """The trained network in model.json `path` (in train mode), checked against the dataset it will
    train on: `grow --from` and `prune --from` start from it instead of a fresh network."""
    model = load_model(path).train()
    spec = model.spec
    if tuple(spec.input_shape) != tuple(info.input_shape) or spec.num_classes != info.num_classes:
        raise GrowError(f"{path} takes {tuple(spec.input_shape)} inputs and {spec.num_classes} classes; "
                        f"{info.name} has {tuple(info.input_shape)} and {info.num_classes}")
    return model


def _dataset_summary(splits: Splits) -> dict:
    info = splits.info
    return {"name": info.name, "input_shape": list(info.input_shape), "num_classes": info.num_classes,
            "train": len(splits.train.labels), "val": len(splits.val.labels), "test": len(splits.test.labels),
            "storage": info.storage, "storage_note": info.storage_note}


def grow_network(config: GrowConfig, reporter: Optional[Reporter] = None, *, resume: bool = False,
                 overwrite: bool = False) -> GrowResult:
    """Grow a network for `config.dataset` within the budget, fine-tune it, export it to `config.out`.

    With `resume=True`, continue the run in `config.out` from its last finished round. The folder is
    locked for the run (grow.rundir); a result already in it is replaced only with `overwrite=True`.
    Raises GrowError (one clear sentence) for problems the user can fix.
    Started by torchrun, every process runs this same call as one run (grow.distributed): each
    trains on its share of every global batch, rank 0 alone writes and reports.
    """
    config.check()
    ctx = distributed.join(distributed.local_device(resolve_device(config.device)), config.out)
    distributed.check_batch_size(config.batch_size, ctx)
    try:
        return _grow_network(config, reporter if ctx.is_main else None, resume, overwrite)
    except RuntimeError as err:  # another rank died: one line that says so, not a gloo traceback
        if distributed.peer_failure(err):
            raise distributed.peer_failure_error(err, config.out) from None
        raise


def _grow_network(config: GrowConfig, reporter: Optional[Reporter], resume: bool, overwrite: bool) -> GrowResult:
    config.check()
    reporter = reporter or NullReporter()
    out = Path(config.out)
    main = distributed.current().is_main  # under torchrun, rank 0 alone owns and writes the run folder
    with rundir.claim(out, resume=resume, overwrite=overwrite) if main else contextlib.nullcontext():
        if resume and main:
            checkpoints.check_resumable(out)
        return _grow_owned(config, reporter, resume, out)


def _grow_owned(config: GrowConfig, reporter: Reporter, resume: bool, out: Path) -> GrowResult:
    """The run itself, in a folder this process owns."""
    if config.from_model and not resume:  # the family is the model's, whatever --space said
        config.space = read_model_json(config.from_model)["arch"].get("family", config.space)
    if distributed.current().is_main:  # under torchrun, rank 0 alone writes the run folder
        out.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_json(out / "config.json", config.to_dict())
    run = _Run(config, reporter)
    start_round, growth_done = 1, False
    if resume:
        model, optimizer, start_round, growth_done = run.restore()
    else:
        model = run.seed_model()
        optimizer = run.make_optimizer(model)
    run.history["distributed"] = distributed.describe(config.batch_size)
    reporter.start(config, run.splits.info, run.device)
    if config.weight_decay is None:
        reporter.message(f"weight decay {run.weight_decay:.2g}, chosen for {run.pictures:,} labelled pictures "
                         f"(--weight-decay sets another)")
    if resume:
        reporter.message(f"resuming {out} at round {start_round}")
    index = start_round
    while not growth_done:
        model, optimizer, growth_done = run.grow_round(model, optimizer, index)
        distributed.check_identical(model, optimizer, run.history["rounds"][-1]["actions"], f"round {index}")
        if distributed.current().is_main:
            run.checkpoint(model, optimizer, index + 1, growth_done)
        index += 1
    model = run.finetune(model)
    test_batches = Batches(run.splits.test, 512, info=run.splits.info, train=False, device=run.device)
    test_loss, test_acc = evaluate(model, test_batches, precision=run.precision)
    run.history["test"] = {"loss": test_loss, "accuracy": test_acc}
    finetuned = run.history["finetune"]["epochs"]
    # After a fine-tune on train + validation no held-out validation figure exists: None, not a fake one.
    final_val = (finetuned or run.history["rounds"])[-1]["val_accuracy"]
    metrics = {"test_accuracy": test_acc, "test_loss": test_loss, "val_accuracy": final_val,
               "epochs": config.total_epochs(), "dataset": run.splits.info.name, "storage": run.splits.info.storage,
               "train_macs": training_macs(run.history)}
    distributed.plain_batchnorm_(model)
    model_json = (save_model(model.cpu(), out, metrics=metrics, extra={"classes": list(run.splits.info.classes)})
                  if distributed.current().is_main else out / "model.json")
    run.history["final"] = {"macs": count_macs(model.spec), "params": count_params(model.spec),
                            "model_json": str(model_json), "spec": model.spec.to_dict(), **metrics}
    if distributed.current().is_main:
        write_json(out / "history.json", run.history)
        pointer = json.loads((out / "checkpoint.json").read_text())
        write_json(out / "checkpoint.json", {**pointer, "finished": True})
        _plot(out, run.history, reporter)
    reporter.finish(run.history, metrics)
    return GrowResult(out, model, run.history, test_acc, "finished")


def training_macs(history: dict) -> int:
    """Training compute of a run: images seen x MACs per image x 3 (forward + backward ~ 3 forwards)."""
    total = 0
    for r in history["rounds"]:
        total += sum(3 * r["macs"] * e["images"] for e in r["epochs"])
    finetune = history.get("finetune") or {"epochs": []}
    total += sum(3 * finetuned_macs(history) * e["images"] for e in finetune["epochs"])
    return total


def finetuned_macs(history: dict) -> int:
    """MACs of the fine-tuned network: the last round's, grown once more where --fill-by ended growth
    (histories written before the fine-tune recorded its MACs: the last round's)."""
    last_round = history["rounds"][-1]["macs"] if history["rounds"] else 0
    return (history.get("finetune") or {}).get("macs", last_round)


def _plot(out: Path, history: dict, reporter: Reporter) -> None:
    try:
        from grow.plots import plot_history
        plot_history(history, out)
    except Exception as err:  # a plot is a convenience: never lose a finished run over it
        reporter.message(f"plots skipped: {err}")
