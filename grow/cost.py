"""What a network costs: multiply-accumulates (MACs) of one forward pass of one image, and parameters.

The growing and pruning literature calls MACs "FLOPs" (ResNet-20 on CIFAR-10: about 41 M). We
count conv and linear layers, as torch.utils.flop_counter does; BatchNorm, activations, pooling
and additions are left out. FLOPs in the strict sense are 2 x MACs.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from grow.spec import ArchSpec


def layer_costs(spec: ArchSpec) -> list[dict]:
    """One row per conv/linear layer: name, kind, in, out, kernel, stride, output, macs, params."""
    from search_spaces import get
    return get(spec.family).layers(spec)


def count_macs(spec: ArchSpec) -> int:
    """Multiply-accumulates of one forward pass of one input, in closed form."""
    return sum(row["macs"] for row in layer_costs(spec))


def count_params(spec: ArchSpec) -> int:
    """Trainable parameters (conv, BatchNorm and linear weights and biases), in closed form."""
    return sum(row["params"] for row in layer_costs(spec))


@torch.no_grad()
def measure_macs(model: nn.Module, input_shape: Optional[Sequence[int]] = None) -> int:
    """MACs of `model` on one input, counted by torch's FlopCounterMode (FLOPs / 2)."""
    shape = tuple(input_shape or model.spec.input_shape)
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *shape, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return counter.get_total_flops() // 2


_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_count(text: str | int | float) -> int:
    """'40M' -> 40000000; accepts plain numbers and K/M/G/T suffixes (base 1000): '1e3M' is 1000M = 1G."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = _COUNT.match(str(text))
        if not match:
            raise ValueError(f"budget {text!r} is not a number with an optional K/M/G suffix (e.g. 40M)")
        value = float(match.group(1)) * _SCALE[match.group(2).lower()]
    if not math.isfinite(value):
        raise ValueError(f"budget {text!r} is not a finite number")
    if not value >= 1:
        raise ValueError(f"budget {text!r} must be at least 1")
    return int(value)
