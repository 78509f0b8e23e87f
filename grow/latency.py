"""Latency that can be trusted: warm-up, repeats, the median with its spread, the thread count,
and a plain word when the machine looks busy.

One timed call is noise on a shared machine: the same small model read 0.26 ms, 0.30 ms and
148 ms for one image in three runs of the old `show`. Here every figure is the median of several
repeats, each repeat long enough (many calls for a fast model) that the clock's resolution and a
single scheduler hiccup do not decide it, and the interquartile range says how far to trust it.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

RUNTIMES = ("eager", "onnxruntime", "pt2", "torchscript")
# A repeat-to-repeat spread (IQR / median) above this means other work competed for the CPU.
BUSY_SPREAD = 0.2


@dataclass
class Latency:
    """Seconds of one forward pass of a batch, as milliseconds: median and spread over repeats."""

    runtime: str
    batch: int
    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    calls_per_repeat: int
    threads: int

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def busy(self) -> bool:
        return self.spread > BUSY_SPREAD

    @property
    def per_image_ms(self) -> float:
        return self.median_ms / self.batch

    def describe(self) -> str:
        """'0.464 ms (IQR 0.460-0.467) for one image', or per batch of N and per image."""
        text = f"{_ms(self.median_ms)} ms (IQR {_ms(self.q1_ms)}-{_ms(self.q3_ms)})"
        if self.batch == 1:
            return f"{text} for one image"
        return f"{text} per batch of {self.batch}, {_ms(self.per_image_ms)} ms per image"

    def to_dict(self) -> dict:
        return {**asdict(self), "per_image_ms": self.per_image_ms, "spread": self.spread, "busy": self.busy}


def _ms(value: float) -> str:
    """About three significant digits, the same decimals for a median and its quartiles."""
    decimals = 0 if value >= 100 else 1 if value >= 10 else 2 if value >= 1 else 3 if value >= 0.1 else 4
    return f"{value:.{decimals}f}"


def measure_latency(model: nn.Module | str | Path, input_shape: Optional[Sequence[int]] = None,
                    batch_sizes: Sequence[int] = (1, 64), runtime: str = "auto", *, repeats: int = 15,
                    warmup: int = 3, threads: Optional[int] = None, min_repeat_s: float = 0.02) -> list[Latency]:
    """Time forward passes of random [0, 1] images on this machine's CPU, one Latency per batch size.

    `model` is a module (timed in PyTorch eager, or first exported to `runtime` and timed there)
    or an exported file (.onnx, .pt2, .torchscript.pt: its runtime follows from the name).
    `runtime`: auto, eager, onnxruntime, pt2 or torchscript. `threads` defaults to torch's
    thread count; ONNX Runtime gets the same, so runtimes compete on equal terms.
    """
    from grow.errors import GrowError

    if runtime not in ("auto",) + RUNTIMES:
        raise GrowError(f"unknown runtime {runtime!r}; choose one of auto, {', '.join(RUNTIMES)}")
    if repeats < 1 or warmup < 0 or any(b < 1 for b in batch_sizes):
        raise GrowError("repeats and batch sizes must be at least 1, warm-up at least 0")
    if input_shape is None and not hasattr(model, "spec"):
        raise GrowError(f"give the input shape (C, H, W) to time {model}")
    threads = threads or torch.get_num_threads()
    shape = tuple(input_shape or model.spec.input_shape)
    previous, was_training = torch.get_num_threads(), getattr(model, "training", False)
    torch.set_num_threads(threads)
    try:
        runtime, forward = _forward(model, runtime, shape, threads)
        return [_measure(forward, runtime, b, shape, repeats, warmup, threads, min_repeat_s) for b in batch_sizes]
    finally:
        torch.set_num_threads(previous)
        if isinstance(model, nn.Module):
            model.train(was_training)


def _forward(model, runtime: str, shape: tuple, threads: int) -> tuple[str, Callable[[torch.Tensor], object]]:
    """The runtime's name and a function images -> logits in it. A module timed in another
    runtime is exported first (batch dynamic, verified on random images) to a temporary file."""
    from grow import deploy
    from grow.errors import GrowError

    if isinstance(model, nn.Module):
        if runtime in ("auto", "eager"):
            return "eager", model.eval()
        fmt = deploy.FORMAT_OF_RUNTIME[runtime]
        with deploy.temporary_export(model, fmt) as path:
            return runtime, deploy.open_exported(path, fmt, threads=threads)
    fmt = deploy.format_of(model)
    if runtime not in ("auto", deploy.RUNTIME_OF[fmt]):
        raise GrowError(f"{model} is a {fmt} file: it runs in {deploy.RUNTIME_OF[fmt]}, not {runtime}")
    return deploy.RUNTIME_OF[fmt], deploy.open_exported(model, fmt, threads=threads)


@torch.no_grad()
def _measure(forward, runtime: str, batch: int, shape: tuple, repeats: int, warmup: int, threads: int,
             min_repeat_s: float) -> Latency:
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    for _ in range(warmup):
        forward(x)
    start = time.perf_counter()
    forward(x)
    once = time.perf_counter() - start
    calls = min(1000, max(1, math.ceil(min_repeat_s / max(once, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            forward(x)
        times.append((time.perf_counter() - start) / calls * 1e3)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive") if repeats > 1 else times * 3
    return Latency(runtime, batch, median, q1, q3, min(times), max(times), repeats, calls, threads)


def machine_note(latencies: Sequence[Latency]) -> Optional[str]:
    """A warning sentence when the figures are probably slower than on an idle machine, else None.

    Two signs: repeats that spread widely, and a load average above the number of cores (other
    processes wanting the CPU even if this measurement happened to dodge them)."""
    busy = [lat for lat in latencies if lat.busy]
    reasons = []
    if busy:
        worst = max(busy, key=lambda lat: lat.spread)
        counted = f"{len(busy)} of {len(latencies)} measurements" if len(latencies) > 1 else "the repeats"
        reasons.append(f"{counted} spread over {BUSY_SPREAD:.0%} (IQR/median; worst {worst.spread:.0%}: "
                       f"{worst.runtime} batch {worst.batch}, whose fastest repeat took {_ms(worst.min_ms)} ms)")
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        reasons.append(f"load average {load:.1f} on {cores} cores")
    if not reasons:
        return None
    hint = ("; several threads on a loaded machine wait for each other, one thread (OMP_NUM_THREADS=1) "
            "gives steadier figures") if any(lat.threads > 1 for lat in latencies) else ""
    return "the machine looks busy (" + "; ".join(reasons) + "): these figures are likely slower and " \
           f"noisier than on an idle machine{hint}"
