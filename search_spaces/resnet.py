"""ResNet family: a stem, stages of basic blocks, global pooling, a classifier.

body: {"stages": [{"width": 16, "blocks": [16, 16, 16]}, ...], "stem": "plain"}: each stage has one
output width shared by the stem (stage 0), its projection shortcut and every block's second conv
(they add into one stream), and each block has its own inner width. Stages after the first start
with a stride-2 block and a 1x1 projection shortcut. The stem is CIFAR's 3x3 conv ("plain") or
ImageNet's 7x7 stride-2 conv and 3x3 stride-2 max-pool ("strided"). ResNet-20/32/56/110 (CIFAR)
and ResNet-18/34 (basic blocks; strided stem above 64 pixels) are members.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from grow.spec import ArchSpec, SpecError, check_keys
from search_spaces.common import (ConvBN, Normalize, check_stem, check_width, conv_out, conv_row, large, linear_row,
                                  pass_through_, scaled, stem_kind, stem_layout, stem_pool)

NAME = "resnet"
CLASSIC_DEPTH = {"resnet20": 3, "resnet32": 5, "resnet56": 9, "resnet110": 18}
# He et al. 2016, Table 1: blocks per stage of the basic-block ImageNet networks, widths 64..512.
# (ResNet-50 and deeper use bottleneck blocks, which this family does not have.)
IMAGENET_BLOCKS = {"resnet18": [2, 2, 2, 2], "resnet34": [3, 4, 6, 3]}


def validate(body: dict) -> None:
    if not isinstance(body, dict):
        raise SpecError("resnet 'body' must be a JSON object {'stages': [...]}")
    check_keys(body, {"stages", "stem"}, "resnet body")
    check_stem(body, "resnet")
    stages = body.get("stages")
    if not (isinstance(stages, list) and stages):
        raise SpecError("resnet 'body.stages' must be a non-empty list of {'width': w, 'blocks': [w, ...]}")
    for s, stage in enumerate(stages):
        if not (isinstance(stage, dict) and isinstance(stage.get("blocks"), list) and stage["blocks"]):
            raise SpecError(f"resnet body.stages[{s}] must be {{'width': w, 'blocks': [inner widths]}} with >= 1 block")
        check_keys(stage, {"width", "blocks"}, f"resnet body.stages[{s}]")
        check_width(stage.get("width"), f"resnet body.stages[{s}].width")
        for b, w in enumerate(stage["blocks"]):
            check_width(w, f"resnet body.stages[{s}].blocks[{b}]")


def _spec(spec: ArchSpec, stages) -> ArchSpec:
    """`spec` with other stages (its stem kept)."""
    return ArchSpec(NAME, tuple(spec.input_shape), spec.num_classes, {**spec.body, "stages": stages},
                    spec.normalization)


def _copy(spec: ArchSpec) -> list[dict]:
    return [{"width": s["width"], "blocks": list(s["blocks"])} for s in spec.body["stages"]]


def seed(input_shape, num_classes: int, normalization: Optional[dict] = None, width: Optional[int] = None) -> ArchSpec:
    """Three stages of one block each, widths w, 2w, 4w (w = 8). Above 64 pixels: the strided
    stem and a fourth stage of 8w, so the stages run at ResNet-18's 56, 28, 14 and 7 pixels on
    224x224 (24M MACs, most of them in the stem)."""
    w = width or 8
    if large(input_shape):
        stages = [{"width": k * w, "blocks": [k * w]} for k in (1, 2, 4, 8)]
        return ArchSpec(NAME, tuple(input_shape), num_classes, {"stages": stages, "stem": "strided"}, normalization)
    stages = [{"width": k * w, "blocks": [k * w]} for k in (1, 2, 4)]
    return ArchSpec(NAME, tuple(input_shape), num_classes, {"stages": stages}, normalization)


def classic(name: str, input_shape, num_classes: int, normalization: Optional[dict] = None) -> ArchSpec:
    """ResNet-20/32/56/110 as on CIFAR (He et al. 2016, section 4.2); ResNet-18/34 as on ImageNet
    (1.82G and 3.67G MACs on 3x224x224), with CIFAR's plain stem up to 64 pixels."""
    if name in IMAGENET_BLOCKS:
        stages = [{"width": w, "blocks": [w] * n} for w, n in zip((64, 128, 256, 512), IMAGENET_BLOCKS[name])]
        body = {"stages": stages, "stem": "strided"} if large(input_shape) else {"stages": stages}
        return ArchSpec(NAME, tuple(input_shape), num_classes, body, normalization)
    if name not in CLASSIC_DEPTH:
        raise SpecError(f"unknown resnet member {name!r}; known: {', '.join([*CLASSIC_DEPTH, *IMAGENET_BLOCKS])} "
                        "(ResNet-50 and deeper use bottleneck blocks, which this family does not have)")
    n = CLASSIC_DEPTH[name]
    stages = [{"width": w, "blocks": [w] * n} for w in (16, 32, 64)]
    return ArchSpec(NAME, tuple(input_shape), num_classes, {"stages": stages}, normalization)


def scale(spec: ArchSpec, factor: float) -> ArchSpec:
    return _spec(spec, [{"width": scaled(s["width"], factor), "blocks": [scaled(b, factor) for b in s["blocks"]]}
                        for s in spec.body["stages"]])


def _has_projection(s: int, b: int) -> bool:
    """Only the first block of a later stage changes size, so only it projects. Fixed by position,
    never by widths, so growth never adds or removes a shortcut."""
    return s > 0 and b == 0


class BasicBlock(nn.Module):
    """conv1 (3x3, stride), conv2 (3x3), plus the stream or its projection.

    The projection is a 1x1 conv at stride 1 on every other pixel: the same function as a 1x1 conv at
    stride 2, whose weight gradient in torch 2.14's oneDNN kernels corrupts the heap (a crash, or a hang
    on two threads) for channels_last inputs with fewer than 8 channels, as a ResNet-20 scaled below
    half width has (tests/test_narrow.py)."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int, project: bool):
        super().__init__()
        self.stride = stride
        self.conv1 = ConvBN(cin, inner, 3, stride)
        self.conv2 = ConvBN(inner, cout, 3, 1, act=None)
        self.shortcut = ConvBN(cin, cout, 1, 1, act=None) if project else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x[:, :, ::self.stride, ::self.stride])
        return torch.relu(self.conv2(self.conv1(x)) + identity)


class ResNet(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        stages = spec.body["stages"]
        self.normalize = Normalize(spec.normalization, spec.input_shape[0])
        self.strided = stem_kind(spec.body) == "strided"
        self.stem = ConvBN(spec.input_shape[0], stages[0]["width"], *stem_layout(self.strided))
        self.stages = nn.ModuleList()
        c = stages[0]["width"]
        for s, stage in enumerate(stages):
            blocks = nn.ModuleList()
            for b, inner in enumerate(stage["blocks"]):
                stride = 2 if _has_projection(s, b) else 1
                blocks.append(BasicBlock(c, inner, stage["width"], stride, _has_projection(s, b)))
                c = stage["width"]
            self.stages.append(blocks)
        self.classifier = nn.Linear(c, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        if self.strided:
            x = stem_pool(x)
        for blocks in self.stages:
            for block in blocks:
                x = block(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(spec: ArchSpec) -> nn.Module:
    return ResNet(spec)


def layers(spec: ArchSpec) -> list[dict]:
    stages = spec.body["stages"]
    hw = tuple(spec.input_shape[1:])
    strided = stem_kind(spec.body) == "strided"
    row, hw = conv_row("stem.conv", spec.input_shape[0], stages[0]["width"], *stem_layout(strided), hw)
    if strided:  # the max-pool
        hw = (conv_out(hw[0], 3, 2), conv_out(hw[1], 3, 2))
    rows, c = [row], stages[0]["width"]
    for s, stage in enumerate(stages):
        for b, inner in enumerate(stage["blocks"]):
            stride = 2 if _has_projection(s, b) else 1
            row1, out_hw = conv_row(f"stages.{s}.{b}.conv1.conv", c, inner, 3, stride, hw)
            row2, _ = conv_row(f"stages.{s}.{b}.conv2.conv", inner, stage["width"], 3, 1, out_hw)
            rows += [row1, row2]
            if _has_projection(s, b):
                # a 1x1 conv at stride 1 on every other pixel (see BasicBlock)
                rows.append(conv_row(f"stages.{s}.{b}.shortcut.conv", c, stage["width"], 1, 1, out_hw)[0])
            hw, c = out_hw, stage["width"]
    rows.append(linear_row("classifier", c, spec.num_classes))
    return rows


def units(spec: ArchSpec) -> list[tuple]:
    """Per stage: the stream (stem/shortcut/second convs, coupled), then each block's inner width."""
    found = []
    for s, stage in enumerate(spec.body["stages"]):
        producers = ["stem.conv"] if s == 0 else []
        producers += [f"stages.{s}.0.shortcut.conv"] if _has_projection(s, 0) else []
        producers += [f"stages.{s}.{b}.conv2.conv" for b in range(len(stage["blocks"]))]
        found.append((f"stages.{s}", stage["width"], tuple(producers), s, "stream"))
        found += [(f"stages.{s}.{b}.conv1.conv", inner, (f"stages.{s}.{b}.conv1.conv",), s, "inner")
                  for b, inner in enumerate(stage["blocks"])]
    return found


def widen_spec(spec: ArchSpec, widths: dict[str, int]) -> ArchSpec:
    stages = _copy(spec)
    for name, width in widths.items():
        parts = name.split(".")
        if len(parts) == 2:
            stages[int(parts[1])]["width"] = width
        else:
            stages[int(parts[1])]["blocks"][int(parts[2])] = width
    return _spec(spec, stages)


def deepenable(spec: ArchSpec) -> list[int]:
    return list(range(len(spec.body["stages"])))


def stage_depth(spec: ArchSpec, stage: int) -> int:
    return len(spec.body["stages"][stage]["blocks"])


def deepen_spec(spec: ArchSpec, stage: int) -> ArchSpec:
    stages = _copy(spec)
    stages[stage]["blocks"].append(stages[stage]["blocks"][-1])
    return _spec(spec, stages)


def init_new_layer(model: nn.Module, stage: int) -> None:
    """The appended block is the identity: its branch ends in a BatchNorm with weight 0, so it
    adds nothing, and ReLU of the (non-negative) stream is the stream. The BatchNorm weight gets
    a gradient at the first step, so the branch opens as training needs it."""
    with torch.no_grad():
        bn = model.stages[stage][-1].conv2.bn
        bn.weight.zero_()
        bn.bias.zero_()


def _last_size(spec: ArchSpec) -> int:
    """Shorter side of the feature map the last stage works on."""
    strided = stem_kind(spec.body) == "strided"
    size = conv_out(min(spec.input_shape[1:]), *stem_layout(strided))
    size = conv_out(size, 3, 2) if strided else size
    for _ in spec.body["stages"][1:]:
        size = conv_out(size, 3, 2)
    return size


def extend_spec(spec: ArchSpec) -> Optional[ArchSpec]:
    """`spec` with one more stage at half the last stage's resolution, one block twice as wide as the
    last stage (ResNet-18 on CIFAR runs a fourth stage at 4x4 pixels); None when half the last stage's
    side is under 2 pixels, as for vgg (a 3x3 map taken to 2x2 lost on 28x28 and 96x96 pictures,
    bench/RESULTS.md, fifteenth wave)."""
    if _last_size(spec) // 2 < 2:
        return None
    width = 2 * spec.body["stages"][-1]["width"]
    return _spec(spec, _copy(spec) + [{"width": width, "blocks": [width]}])


def init_new_stage(model: nn.Module) -> None:
    """The new stage's block starts as its shortcut alone: the branch ends in a BatchNorm of weight 0
    (as an appended block), and the 1x1 shortcut (on every other pixel) passes the old stream's channels through
    (identity kernel and BN; ReLU of the non-negative stream changes nothing). Its other channels are
    random projections at the identity rows' norm, which the classifier does not read yet. Not exactly
    function-preserving: the classifier now averages every other pixel of the old last map."""
    block = model.stages[-1][0]
    pass_through_(block.shortcut)
    with torch.no_grad():
        block.conv2.bn.weight.zero_()
        block.conv2.bn.bias.zero_()
