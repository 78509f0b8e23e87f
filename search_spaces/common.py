"""Pieces every family uses: input normalisation, conv+BN(+activation), cost rows, width checks."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from grow.spec import SpecError


class Normalize(nn.Module):
    """(x - mean) / std per channel. Buffers are not persistent: they come from the spec."""

    def __init__(self, normalization: Optional[dict], channels: int):
        super().__init__()
        mean = normalization["mean"] if normalization else [0.0] * channels
        std = normalization["std"] if normalization else [1.0] * channels
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm -> optional activation."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 act: Optional[type] = nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = act(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def conv_out(size: int, kernel: int, stride: int) -> int:
    """Output size of a conv with padding kernel // 2."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def conv_row(name: str, cin: int, cout: int, kernel: int, stride: int, hw: tuple[int, int],
             groups: int = 1, bn: bool = True) -> tuple[dict, tuple[int, int]]:
    """Cost row of a conv (+BN) on an input of spatial size `hw`; returns the row and output size."""
    h, w = conv_out(hw[0], kernel, stride), conv_out(hw[1], kernel, stride)
    weights = cout * (cin // groups) * kernel * kernel
    row = {"name": name, "kind": "dwconv" if groups > 1 else "conv", "in": cin, "out": cout, "kernel": kernel,
           "stride": stride, "output": f"{h}x{w}", "macs": weights * h * w,
           "params": weights + (2 * cout if bn else 0)}
    return row, (h, w)


# Inputs at least this many pixels on their short side get the strided stem in the seeds (and the
# ImageNet members): photos carry little per pixel, and a network that keeps full resolution through
# its first layers spends most of its MACs there (resnet20 at 224x224: 2G MACs). Above 64 pixels, as
# MobileNetV2's CIFAR adaptation draws the line: with the line at 128, the seeds of 65-127 pixel
# pictures cost up to 3x (vgg), 6x (resnet) and 8x (mobilenet) what they cost at 128, and a 96x96
# vgg seed (9.95M MACs) did not fit a 5M budget that fits the seed of 128x128 pictures.
STRIDED_FROM = 65
# "plain": the first conv is a 3x3 at stride 1 (CIFAR networks). "strided": a 7x7 conv at stride 2,
# then a 3x3 max-pool at stride 2, as in ResNet-18/50 on ImageNet: a quarter of the resolution.
STEMS = ("plain", "strided")


def stem_kind(body: dict) -> str:
    """The stem a body asks for; bodies written before the key existed are plain."""
    return body.get("stem", "plain")


def check_stem(body: dict, family: str) -> None:
    if stem_kind(body) not in STEMS:
        raise SpecError(f"{family} body.stem must be one of {', '.join(map(repr, STEMS))}, got {body['stem']!r}")


def large(input_shape) -> bool:
    """Whether an input (C, H, W) is large enough for the strided stem (STRIDED_FROM)."""
    return min(input_shape[1:]) >= STRIDED_FROM


def stem_layout(strided: bool) -> tuple[int, int]:
    """(kernel, stride) of the first conv."""
    return (7, 2) if strided else (3, 1)


def stem_pool(x: torch.Tensor) -> torch.Tensor:
    """The strided stem's 3x3 max-pool at stride 2 (output size as a 3x3 conv at stride 2)."""
    return nn.functional.max_pool2d(x, 3, 2, 1)


def linear_row(name: str, cin: int, cout: int) -> dict:
    return {"name": name, "kind": "linear", "in": cin, "out": cout, "kernel": "", "stride": "", "output": "",
            "macs": cin * cout, "params": cin * cout + cout}


def check_width(value: Any, where: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise SpecError(f"{where} must be a positive integer width, got {value!r}")


def scaled(width: int, factor: float) -> int:
    return max(1, int(round(width * factor)))


def identity_conv_(conv: nn.Conv2d) -> None:
    """Make a square conv compute the identity (centre tap 1 from channel i to channel i) on the
    channels it has both as input and output; further outputs are left zero."""
    with torch.no_grad():
        conv.weight.zero_()
        k = conv.kernel_size[0] // 2
        for i in range(min(conv.out_channels, conv.in_channels)):
            conv.weight[i, i, k, k] = 1.0


def identity_bn_(bn: nn.BatchNorm2d) -> None:
    """Make BatchNorm the identity in eval mode for its current running statistics."""
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps))
        bn.bias.copy_(bn.running_mean)


def pass_through_(layer: ConvBN) -> None:
    """Make a new stage's widening conv+BN pass its input through: identity kernel and BN on the channels
    it has as input, and its further (random) filters kept, scaled to the identity rows' norm (1)."""
    old = layer.conv.in_channels
    with torch.no_grad():
        new_rows = layer.conv.weight[old:].clone()
        identity_conv_(layer.conv)
        layer.conv.weight[old:] = new_rows / new_rows.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
    identity_bn_(layer.bn)
