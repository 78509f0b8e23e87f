"""One epoch of training or evaluation: autocast, channels_last, and counters summed over processes."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


# Reading the loss back to the host forces a device sync; doing it every few batches keeps
# GPUs busy while still catching a divergence within a few steps.
CHECK_EVERY = 20

BatchCallback = Callable[[int, int, float, float], None]  # (done, total, loss, accuracy)
Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over processes


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable,
    *,
    scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
    on_batch: Optional[BatchCallback] = None,
    label_smoothing: float = 0.0,
    channels_last: bool = True,
    precision: Optional[torch.dtype] = None,
    scaler: Optional[torch.amp.GradScaler] = None,
    reduce: Optional[Reduce] = None,
) -> EpochStats:
    """Train for one pass over `batches`; raise Diverged as soon as the loss is not finite.

    `scheduler` (if given) steps once per batch, so cosine schedules are smooth within an epoch.
    With `channels_last` the model and each batch use the NHWC memory layout, which measured
    1.8x faster than NCHW for a 3.7M-MAC CNN on a 2-core CPU (bench/RESULTS.md).
    `precision` (torch.bfloat16 or torch.float16) runs the forward pass under autocast; pass a
    GradScaler with float16, whose skipped steps (inf gradients) DessiLBI honours. `reduce` sums
    the (loss, correct, images) counters over processes (grow.distributed.all_reduce_sum), so
    every rank reports, and stops on, the loss of the whole global batch.
    """
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=layout)
    model.train()
    total = len(batches)  # type: ignore[arg-type]
    start = time.perf_counter()
    counts = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    for i, (x, y) in enumerate(batches, 1):
        with autocast(x.device, precision):
            logits = model(x.contiguous(memory_format=layout))
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch = torch.stack([loss.detach().double() * y.shape[0], (logits.detach().argmax(1) == y).sum().double(),
                             torch.tensor(float(y.shape[0]), dtype=torch.float64, device=loss.device)])
        counts = counts.to(loss.device) + batch
        if i % CHECK_EVERY == 0 or i == total:
            loss_sum, correct, seen = (reduce(counts) if reduce else counts).tolist()
            mean_loss = loss_sum / max(seen, 1)
            if not math.isfinite(mean_loss):
                raise Diverged(f"the training loss became {mean_loss} after {i} batches")
            if on_batch is not None:
                on_batch(i, total, mean_loss, correct / max(seen, 1))
    seconds = time.perf_counter() - start
    loss_sum, correct, seen = (reduce(counts) if reduce else counts).tolist()
    if seen == 0:
        return EpochStats(float("nan"), 0.0, 0, seconds)
    return EpochStats(loss_sum / seen, correct / seen, int(seen), seconds)


def autocast(device: torch.device, precision: Optional[torch.dtype]):
    """torch.autocast for `precision` (bfloat16, float16), or nothing for None / float32."""
    enabled = precision is not None and precision != torch.float32
    return torch.autocast(device.type, dtype=precision if enabled else None, enabled=enabled)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, precision: Optional[torch.dtype] = None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` (eval mode) over `batches`. (Under torchrun every
    rank evaluates all of them: the same numbers everywhere, with no collective to wait on.)"""
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, images
    for x, y in batches:
        with autocast(x.device, precision):
            logits = model(x)
        counts = counts.to(logits.device) + torch.stack([
            F.cross_entropy(logits.float(), y, reduction="sum").double(), (logits.argmax(1) == y).sum().double(),
            torch.tensor(float(y.shape[0]), dtype=torch.float64, device=logits.device)])
    loss_sum, correct, seen = counts.tolist()
    if seen == 0:
        return float("nan"), 0.0
    return loss_sum / seen, correct / seen


PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_precision(name: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype for `name` on `device`, None for float32.

    "auto": bfloat16 on a CUDA GPU that supports it (float16 on older ones), float32 elsewhere: on
    CPUs without bf16 units autocast costs more than it saves, and the CPU default stays exact.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def grad_scaler(precision: Optional[torch.dtype], device: torch.device) -> Optional[torch.amp.GradScaler]:
    """float16 gradients underflow without loss scaling; bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler(device.type) if precision == torch.float16 else None


class Accelerated:
    """The module that actually trains a model: in its memory layout (channels_last), wrapped (DDP under torchrun, see
    grow.distributed.wrap) and, with `compile`, torch.compile'd.

    Built once per network and reused for every epoch; built again when the model object or its
    storage changes (after a growth step, or a move to another device and back), because DDP and
    compiled graphs hold on to the old parameters. Compiling is timed apart from training: right
    after torch.compile, one forward and backward pass on a random batch of the training shape
    compiles both graphs (weights, gradients and BatchNorm statistics are left as they were), and
    `take_compile_seconds()` hands its time to the caller once.
    """

    def __init__(self, wrap: Callable[[nn.Module], nn.Module] = lambda m: m, *, compile: bool = False,
                 precision: Optional[torch.dtype] = None, channels_last: bool = True):
        self.wrap = wrap
        self.compile = compile
        self.precision = precision
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self._built: Optional[tuple] = None  # (model, storage key, trainable module)
        self._compile_seconds = 0.0

    def __call__(self, model: nn.Module, batch_shape: tuple[int, ...]) -> nn.Module:
        if self._built is None or self._built[0] is not model or self._built[1] != _storage(model):
            model.to(memory_format=self.layout)
            net = self.wrap(model)
            if self.compile:
                net = torch.compile(net)
                self._compile_seconds += self._warm_up(model, net, batch_shape)
            self._built = (model, _storage(model), net)
        return self._built[2]

    def take_compile_seconds(self) -> float:
        seconds, self._compile_seconds = self._compile_seconds, 0.0
        return seconds

    def _warm_up(self, model: nn.Module, net: nn.Module, batch_shape: tuple[int, ...]) -> float:
        device = next(model.parameters()).device
        buffers = {k: v.clone() for k, v in model.named_buffers()}
        start = time.perf_counter()
        net.train()
        x = torch.rand(batch_shape, device=device).contiguous(memory_format=self.layout)
        with autocast(device, self.precision):
            loss = net(x).float().logsumexp(1).mean()
        loss.backward()
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        return seconds


def _storage(model: nn.Module) -> tuple:
    """Where the first parameter lives: changes when the model moves or changes layout."""
    first = next(model.parameters())
    return first.device, first.data_ptr()
