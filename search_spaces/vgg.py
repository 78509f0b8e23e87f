"""VGG family: 3x3 conv + BatchNorm + ReLU layers in stages separated by 2x2 max-pooling.

body: {"stages": [[w, w, ...], ...], "stem": "plain"}: every conv has its own width. Global average
pooling and one linear classifier end the network. A stage is pooled after only while the image is
at least 2 pixels on a side, so the family works from 28x28 digits to 224x224 photos. With "stem":
"strided" (the seed's choice above 64 pixels) the first conv is a 7x7 at stride 2 followed by a
3x3 max-pool at stride 2, as ResNet's ImageNet stem; VGG-11/16 keep VGG's own 3x3 first layer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from grow.spec import ArchSpec, SpecError, check_keys
from search_spaces.common import (ConvBN, Normalize, check_stem, check_width, conv_out, conv_row, identity_bn_,
                                  identity_conv_, large, linear_row, pass_through_, scaled, stem_kind, stem_layout,
                                  stem_pool)

NAME = "vgg"
CLASSIC = {
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
}


def validate(body: dict) -> None:
    if not isinstance(body, dict):
        raise SpecError("vgg 'body' must be a JSON object {'stages': [[widths], ...]}")
    check_keys(body, {"stages", "stem"}, "vgg body")
    check_stem(body, "vgg")
    stages = body.get("stages")
    if not (isinstance(stages, list) and stages and all(isinstance(s, list) and s for s in stages)):
        raise SpecError("vgg 'body.stages' must be a non-empty list of non-empty lists of widths")
    for s, widths in enumerate(stages):
        for i, w in enumerate(widths):
            check_width(w, f"vgg body.stages[{s}][{i}]")


def seed(input_shape, num_classes: int, normalization: Optional[dict] = None, width: Optional[int] = None,
         last_side: int = 4) -> ArchSpec:
    """Growth's seed: one conv per stage, widths w, 2w, 4w, 8w (w = 8), with as many stages (up to
    four) as halvings leave the image at least `last_side` pixels wide: about 0.7M MACs on 32x32.
    The low-resolution stages are cheap per filter, so growth has room to add capacity there. A
    stage that would work on 3 pixels (28x28 pictures; 96x96 ones behind the strided stem) is left
    for growth to add (grow.morph.extend) when the budget pays for it: grown so, Fashion-MNIST at
    3M MACs scored 0.12 higher over ten seeds (bench/RESULTS.md, twentieth wave). Above 64 pixels
    the first conv is the strided stem (17.5M MACs on 224x224 instead of 54M, its four stages at
    56, 28, 14 and 7 pixels as ResNet-18's)."""
    w = width or 8
    strided = large(input_shape)
    size, stages = min(input_shape[1:]) // (4 if strided else 1), 1
    while stages < 4 and size // 2 >= last_side:
        size, stages = size // 2, stages + 1
    body = {"stages": [[w * 2**k] for k in range(stages)]}
    if strided:
        body["stem"] = "strided"
    return ArchSpec(NAME, tuple(input_shape), num_classes, body, normalization)


def shallow(input_shape, num_classes: int, normalization: Optional[dict] = None) -> ArchSpec:
    """The hand shape a practitioner scales: the seed's topology with every stage down to 3 pixels."""
    return seed(input_shape, num_classes, normalization, last_side=3)


def classic(name: str, input_shape, num_classes: int, normalization: Optional[dict] = None) -> ArchSpec:
    if name not in CLASSIC:
        raise SpecError(f"unknown vgg member {name!r}; known: {', '.join(CLASSIC)}")
    return ArchSpec(NAME, tuple(input_shape), num_classes, {"stages": [list(s) for s in CLASSIC[name]]}, normalization)


def _with_stages(spec: ArchSpec, stages: list[list[int]]) -> ArchSpec:
    """`spec` with other stages (the stem, and any other key of the body, kept)."""
    return ArchSpec(spec.family, spec.input_shape, spec.num_classes, {**spec.body, "stages": stages},
                    spec.normalization)


def scale(spec: ArchSpec, factor: float) -> ArchSpec:
    return _with_stages(spec, [[scaled(w, factor) for w in s] for s in spec.body["stages"]])


def _strided(spec: ArchSpec) -> bool:
    return stem_kind(spec.body) == "strided"


def _after_stem(hw: tuple[int, int]) -> tuple[int, int]:
    """Size after the strided stem's conv and max-pool (both 'same'-padded, stride 2)."""
    return tuple(conv_out(conv_out(x, 7, 2), 3, 2) for x in hw)  # type: ignore[return-value]


def _stage_sizes(spec: ArchSpec) -> list[int]:
    """Shorter side of the image each stage works on: a stage is pooled after (2x2) only while that
    is at least 2 pixels, and the last stage never is."""
    size = min(_after_stem(spec.input_shape[1:]) if _strided(spec) else spec.input_shape[1:])
    sizes = []
    for s in range(len(spec.body["stages"])):
        sizes.append(size)
        if s < len(spec.body["stages"]) - 1 and size >= 2:
            size //= 2
    return sizes


def _pools(spec: ArchSpec) -> list[bool]:
    """Whether each stage is followed by 2x2 max-pooling."""
    sizes = _stage_sizes(spec)
    return [s < len(sizes) - 1 and size >= 2 for s, size in enumerate(sizes)]


class VGG(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        c = spec.input_shape[0]
        self.normalize = Normalize(spec.normalization, c)
        self.stages = nn.ModuleList()
        self.strided = _strided(spec)
        for s, widths in enumerate(spec.body["stages"]):
            layers = nn.ModuleList()
            for i, w in enumerate(widths):
                kernel, stride = stem_layout(self.strided and s == i == 0)
                layers.append(ConvBN(c, w, kernel, stride))
                c = w
            self.stages.append(layers)
        self.pools = _pools(spec)
        self.classifier = nn.Linear(c, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        for s, (layers, pool) in enumerate(zip(self.stages, self.pools)):
            for i, layer in enumerate(layers):
                x = layer(x)
                if self.strided and s == i == 0:
                    x = stem_pool(x)
            if pool:
                x = nn.functional.max_pool2d(x, 2)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(spec: ArchSpec) -> nn.Module:
    return VGG(spec)


def layers(spec: ArchSpec) -> list[dict]:
    c, hw = spec.input_shape[0], tuple(spec.input_shape[1:])
    rows = []
    for s, (widths, pool) in enumerate(zip(spec.body["stages"], _pools(spec))):
        for i, w in enumerate(widths):
            stem = _strided(spec) and s == i == 0
            row, hw = conv_row(f"stages.{s}.{i}.conv", c, w, *stem_layout(stem), hw)
            rows.append(row)
            c = w
            if stem:
                hw = (conv_out(hw[0], 3, 2), conv_out(hw[1], 3, 2))
        if pool:
            hw = (hw[0] // 2, hw[1] // 2)
    rows.append(linear_row("classifier", c, spec.num_classes))
    return rows


def units(spec: ArchSpec) -> list[tuple]:
    """(name, width, producers, stage, kind) of every growable width: each conv on its own."""
    return [(f"stages.{s}.{i}.conv", w, (f"stages.{s}.{i}.conv",), s, "conv")
            for s, widths in enumerate(spec.body["stages"]) for i, w in enumerate(widths)]


def widen_spec(spec: ArchSpec, widths: dict[str, int]) -> ArchSpec:
    stages = [list(s) for s in spec.body["stages"]]
    for name, width in widths.items():
        _, s, i, _ = name.split(".")
        stages[int(s)][int(i)] = width
    return _with_stages(spec, stages)


def deepenable(spec: ArchSpec) -> list[int]:
    return list(range(len(spec.body["stages"])))


def stage_depth(spec: ArchSpec, stage: int) -> int:
    return len(spec.body["stages"][stage])


def deepen_spec(spec: ArchSpec, stage: int) -> ArchSpec:
    stages = [list(s) for s in spec.body["stages"]]
    stages[stage].append(stages[stage][-1])
    return _with_stages(spec, stages)


def extend_spec(spec: ArchSpec) -> Optional[ArchSpec]:
    """`spec` with one more stage after one more 2x2 pooling, twice as wide as the last stage (as every
    stage of the seed is twice its predecessor); None when the new stage would see less than 2 pixels
    a side (a 3x3 conv on one pixel is a linear layer, not a stage)."""
    if _stage_sizes(spec)[-1] // 2 < 2:
        return None
    return _with_stages(spec, [list(s) for s in spec.body["stages"]] + [[2 * spec.body["stages"][-1][-1]]])


def init_new_stage(model: nn.Module) -> None:
    """The new last stage passes the old stage's features through: its first channels are the identity
    (identity kernel and BN, ReLU of non-negative input), the rest are new filters whose classifier
    weights are zero. What changes is the pooling: the classifier now averages the 2x2 max-pooled
    map instead of the whole one, which shifts the logits a little; training takes it from there."""
    pass_through_(model.stages[-1][0])


def init_new_layer(model: nn.Module, stage: int) -> None:
    """The appended layer computes the identity: identity kernel, BN the identity for its
    running statistics, and ReLU of the previous ReLU's (non-negative) output changes nothing."""
    layer = model.stages[stage][-1]
    identity_conv_(layer.conv)
    identity_bn_(layer.bn)
