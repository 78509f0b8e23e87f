"""The dense training recipe: how grow fine-tunes a grown network and how it trains any fixed one.

One recipe serves the fine-tune after growth, a grown architecture retrained from scratch and the
baselines of bench/suite.py, so that a comparison between them is a comparison of architectures
and growth, not of training tricks. SGD with Nesterov momentum, a one-cycle schedule (a short warm-up
to the peak lr, then cosine annealing to nearly zero) and label smoothing 0.1: on the 5,170 real
CIFAR-10 pictures this recipe was worth 5-7 points over a plain cosine schedule without smoothing
(bench/RESULTS.md), more than any architecture decision. Only the peak lr differs: 0.1 (Recipe's
default) from scratch, 0.2 for the fine-tune of a warm-started grown network (GrowConfig.finetune_lr),
each the better of the two for its case on the CIFAR-10 pictures. The warm-up (15% of the steps) is
the same for both; GrowConfig.finetune_warmup can change the fine-tune's. The weight decay depends on
the number of labelled pictures (`weight_decay_for`), the same for every network trained on them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from grow.data import Batches, Splits, TensorSet
from grow.spec import ArchSpec, build
from grow.train import EpochStats, evaluate, grad_scaler, train_epoch


@dataclass(frozen=True)
class Recipe:
    """SGD settings of a dense training phase. `warmup` is the share of steps spent rising to `lr`."""

    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    warmup: float = 0.15

    def optimizer(self, model: nn.Module, total_steps: int):
        """Nesterov SGD and its one-cycle schedule over `total_steps` batches."""
        optimizer = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, nesterov=True,
                                    weight_decay=self.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=max(2, total_steps), pct_start=self.warmup,
            anneal_strategy="cos", cycle_momentum=False, div_factor=10.0, final_div_factor=100.0)
        return optimizer, scheduler


def merged(*sets):
    """One set holding every image of `sets` (for training on train + validation): a TensorSet, or
    for pictures streamed from disk a grow.stream.FileSet."""
    if not isinstance(sets[0], TensorSet):
        from grow.stream import FileSet
        return FileSet.concat(sets)
    return TensorSet(torch.cat([s.images for s in sets]), torch.cat([s.labels for s in sets]))


WEIGHT_DECAY = 5e-4  # up to WEIGHT_DECAY_UNTIL labelled pictures
WEIGHT_DECAY_UNTIL = 10_000
WEIGHT_DECAY_FLOOR = 1e-4  # reached at 5x WEIGHT_DECAY_UNTIL pictures


def weight_decay_for(pictures: int) -> float:
    """The default weight decay for a training set of `pictures` labelled pictures: 5e-4 up to 10,000,
    then 5e-4 x 10,000 / pictures, down to 1e-4, which it reaches at 50,000 (full CIFAR-10; Fashion-MNIST).

    Why 1/pictures: weight decay is a Gaussian prior on the weights, and the loss it is added to is the
    mean over the pictures, so the prior's share of it falls as one over their number. Why a floor:
    1e-4 is what networks trained on ImageNet's 1.28M pictures use; below it nothing was measured. One
    constant served neither of our sets: on the 4,170 CIFAR-10 pictures 5e-4 keeps growth's lead at
    20M MACs (+2.07 points over the seed topology scaled, +0.92 at 1e-4, six seeds), while on
    Fashion-MNIST's 60,000 the grown vgg network gains with less (3M MACs: +0.19 at 1e-4 over ten seeds,
    +0.09 at 1.4e-4 over eight) and the networks it is compared with stay even (bench/RESULTS.md,
    twenty-third and twenty-fourth waves). In between, at 10,000 Fashion-MNIST pictures, 5e-4 was still
    the grown network's best (2.5e-4 -0.19, 1e-4 -0.23, four seeds), so the fall starts there."""
    if pictures < 1:
        raise ValueError(f"pictures must be positive, got {pictures}")
    return min(WEIGHT_DECAY, max(WEIGHT_DECAY_FLOOR, WEIGHT_DECAY * WEIGHT_DECAY_UNTIL / pictures))


EpochCallback = Callable[[int, EpochStats], None]


def train_spec(spec: ArchSpec, splits: Splits, epochs: int, recipe: Recipe = Recipe(), *, seed: int = 0,
               batch_size: int = 128, augment: bool = True, include_val: bool = True,
               device: str | torch.device = "cpu", precision: Optional[torch.dtype] = None,
               on_epoch: Optional[EpochCallback] = None) -> dict:
    """Train the architecture `spec` from scratch with `recipe` for `epochs`; evaluate once on the test split.

    With `include_val` the validation split is trained on too: a fixed network makes no decisions
    that need held-out data, so a practitioner trains it on every labelled image.
    `precision` (torch.bfloat16 or torch.float16; None = float32) is the autocast dtype, as in
    grow.train.train_epoch.
    Returns the model and its figures (test accuracy, images seen, seconds).
    """
    torch.manual_seed(seed)
    model = build(spec).to(device)
    data = merged(splits.train, splits.val) if include_val and len(splits.val) else splits.train
    batches = Batches(data, batch_size, info=splits.info, train=True, device=device, seed=seed, augment=augment)
    optimizer, scheduler = recipe.optimizer(model, epochs * len(batches))
    start, images = time.perf_counter(), 0
    scaler = grad_scaler(precision, torch.device(device))
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        stats = train_epoch(model, optimizer, batches, scheduler=scheduler, label_smoothing=recipe.label_smoothing,
                            precision=precision, scaler=scaler)
        images += stats.images
        if on_epoch is not None:
            on_epoch(epoch + 1, stats)
    seconds = time.perf_counter() - start
    test_loss, test_acc = evaluate(model, Batches(splits.test, 512, info=splits.info, train=False, device=device),
                                   precision=precision)
    return {"model": model, "test_accuracy": test_acc, "test_loss": test_loss, "images": images,
            "seconds": seconds, "epochs": epochs}
