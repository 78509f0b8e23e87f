"""MobileNetV2 family: inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear project).

body: {"stem": 32, "stem_stride": 1, "stages": [{"width": 16, "stride": 1, "blocks": [32]}, ...],
"head": 1280}: each block's expansion (hidden) width, each stage's output width (shared by its
blocks' projections: a coupled stream), the stem and the final 1x1 head conv can all grow. Blocks
after the first of a stage add their input (a residual), fixed by position so growth never adds
or removes one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from grow.spec import ArchSpec, SpecError, check_keys
from search_spaces.common import ConvBN, Normalize, check_width, conv_row, large, linear_row, scaled

NAME = "mobilenet"
# (expansion t, width c, blocks n, stride s) of MobileNetV2 (Sandler et al. 2018)
V2 = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _is_stride(value) -> bool:
    return type(value) is int and value in (1, 2)


def validate(body: dict) -> None:
    if not isinstance(body, dict):
        raise SpecError("mobilenet 'body' must be a JSON object {'stem', 'stem_stride', 'stages', 'head'}")
    check_keys(body, {"stem", "stem_stride", "stages", "head"}, "mobilenet body")
    check_width(body.get("stem"), "mobilenet body.stem")
    check_width(body.get("head"), "mobilenet body.head")
    if not _is_stride(body.get("stem_stride", 1)):
        raise SpecError("mobilenet body.stem_stride must be 1 or 2")
    stages = body.get("stages")
    if not (isinstance(stages, list) and stages):
        raise SpecError("mobilenet 'body.stages' must be a non-empty list of {'width', 'stride', 'blocks'}")
    for s, stage in enumerate(stages):
        if not (isinstance(stage, dict) and isinstance(stage.get("blocks"), list) and stage["blocks"]):
            raise SpecError(f"mobilenet body.stages[{s}] must be {{'width', 'stride', 'blocks': [hidden widths]}}")
        check_keys(stage, {"width", "stride", "blocks"}, f"mobilenet body.stages[{s}]")
        check_width(stage.get("width"), f"mobilenet body.stages[{s}].width")
        if not _is_stride(stage.get("stride")):
            raise SpecError(f"mobilenet body.stages[{s}].stride must be 1 or 2")
        for b, w in enumerate(stage["blocks"]):
            check_width(w, f"mobilenet body.stages[{s}].blocks[{b}]")


def _spec(spec_like, body) -> ArchSpec:
    return ArchSpec(NAME, tuple(spec_like.input_shape), spec_like.num_classes, body, spec_like.normalization)


def _copy(body: dict) -> dict:
    return {**body, "stages": [{**s, "blocks": list(s["blocks"])} for s in body["stages"]]}


def seed(input_shape, num_classes: int, normalization: Optional[dict] = None, width: Optional[int] = None) -> ArchSpec:
    """Stem w, four stages of one block (widths w, 2w, 3w, 4w; expansion 2, the last 1.5), a 1x1 head of
    8w (w = 8): on 32x32 pictures the blocks run at 32, 16, 8 and 4 pixels, as MobileNetV2's CIFAR
    adaptation reaches 4x4. Above 64 pixels, MobileNetV2's total stride of 32: a stride-2 stem and every
    stage at stride 2 (on 224x224 the blocks run at 56, 28, 14 and 7 pixels)."""
    w = width or 8
    stages = [{"width": w, "stride": 1, "blocks": [2 * w]}, {"width": 2 * w, "stride": 2, "blocks": [2 * w]},
              {"width": 3 * w, "stride": 2, "blocks": [4 * w]}, {"width": 4 * w, "stride": 2, "blocks": [6 * w]}]
    body = {"stem": w, "stem_stride": 1, "stages": stages, "head": 8 * w}
    if large(input_shape):
        stages[0]["stride"] = 2
        body["stem_stride"] = 2
    return ArchSpec(NAME, tuple(input_shape), num_classes, body, normalization)


def classic(name: str, input_shape, num_classes: int, normalization: Optional[dict] = None) -> ArchSpec:
    """MobileNetV2; for inputs of 64 pixels or less (CIFAR) the stem and the second stage keep
    the resolution, as CIFAR adaptations of it do.

    One difference from the paper: its first block (expansion 1) keeps a 1x1 expansion conv, so
    that block's hidden width can grow like every other. On 3x224x224 that costs 313.6M MACs and
    3.506M parameters against torchvision's 300.8M and 3.505M."""
    if name != "mobilenetv2":
        raise SpecError(f"unknown mobilenet member {name!r}; known: mobilenetv2")
    small = not large(input_shape)
    stages, c = [], 32
    for i, (t, width, n, stride) in enumerate(V2):
        stride = 1 if small and i == 1 else stride
        stages.append({"width": width, "stride": stride, "blocks": [c * t] + [width * t] * (n - 1)})
        c = width
    body = {"stem": 32, "stem_stride": 1 if small else 2, "stages": stages, "head": 1280}
    return ArchSpec(NAME, tuple(input_shape), num_classes, body, normalization)


def scale(spec: ArchSpec, factor: float) -> ArchSpec:
    body = _copy(spec.body)
    body["stem"], body["head"] = scaled(body["stem"], factor), scaled(body["head"], factor)
    for stage in body["stages"]:
        stage["width"] = scaled(stage["width"], factor)
        stage["blocks"] = [scaled(b, factor) for b in stage["blocks"]]
    return _spec(spec, body)


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, residual: bool):
        super().__init__()
        self.expand = ConvBN(cin, hidden, 1, act=nn.ReLU6)
        self.depthwise = ConvBN(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = ConvBN(hidden, cout, 1, act=None)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self, spec: ArchSpec):
        super().__init__()
        self.spec = spec
        body = spec.body
        self.normalize = Normalize(spec.normalization, spec.input_shape[0])
        self.stem = ConvBN(spec.input_shape[0], body["stem"], 3, body.get("stem_stride", 1), act=nn.ReLU6)
        self.stages = nn.ModuleList()
        c = body["stem"]
        for stage in body["stages"]:
            blocks = nn.ModuleList()
            for b, hidden in enumerate(stage["blocks"]):
                blocks.append(InvertedResidual(c, hidden, stage["width"], stage["stride"] if b == 0 else 1, b > 0))
                c = stage["width"]
            self.stages.append(blocks)
        self.head = ConvBN(c, body["head"], 1, act=nn.ReLU6)
        self.classifier = nn.Linear(body["head"], spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalize(x))
        for blocks in self.stages:
            for block in blocks:
                x = block(x)
        x = self.head(x)
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build(spec: ArchSpec) -> nn.Module:
    return MobileNet(spec)


def layers(spec: ArchSpec) -> list[dict]:
    body = spec.body
    row, hw = conv_row("stem.conv", spec.input_shape[0], body["stem"], 3, body.get("stem_stride", 1),
                       tuple(spec.input_shape[1:]))
    rows, c = [row], body["stem"]
    for s, stage in enumerate(body["stages"]):
        for b, hidden in enumerate(stage["blocks"]):
            name, stride = f"stages.{s}.{b}", stage["stride"] if b == 0 else 1
            rows.append(conv_row(f"{name}.expand.conv", c, hidden, 1, 1, hw)[0])
            row, hw = conv_row(f"{name}.depthwise.conv", hidden, hidden, 3, stride, hw, groups=hidden)
            rows.append(row)
            rows.append(conv_row(f"{name}.project.conv", hidden, stage["width"], 1, 1, hw)[0])
            c = stage["width"]
    rows.append(conv_row("head.conv", c, body["head"], 1, 1, hw)[0])
    rows.append(linear_row("classifier", body["head"], spec.num_classes))
    return rows


def units(spec: ArchSpec) -> list[tuple]:
    """The stem, then per stage its stream (the blocks' projections) and each block's expansion,
    then the head. The depthwise convs follow their expansion and carry no Gamma of their own."""
    body, last = spec.body, len(spec.body["stages"]) - 1
    found = [("stem.conv", body["stem"], ("stem.conv",), 0, "stem")]
    for s, stage in enumerate(body["stages"]):
        producers = tuple(f"stages.{s}.{b}.project.conv" for b in range(len(stage["blocks"])))
        found.append((f"stages.{s}", stage["width"], producers, s, "stream"))
        found += [(f"stages.{s}.{b}.expand.conv", hidden, (f"stages.{s}.{b}.expand.conv",), s, "expand")
                  for b, hidden in enumerate(stage["blocks"])]
    found.append(("head.conv", body["head"], ("head.conv",), last, "head"))
    return found


def widen_spec(spec: ArchSpec, widths: dict[str, int]) -> ArchSpec:
    body = _copy(spec.body)
    for name, width in widths.items():
        parts = name.split(".")
        if name in ("stem.conv", "head.conv"):
            body[parts[0]] = width
        elif len(parts) == 2:
            body["stages"][int(parts[1])]["width"] = width
        else:
            body["stages"][int(parts[1])]["blocks"][int(parts[2])] = width
    return _spec(spec, body)


def deepenable(spec: ArchSpec) -> list[int]:
    return list(range(len(spec.body["stages"])))


def stage_depth(spec: ArchSpec, stage: int) -> int:
    return len(spec.body["stages"][stage]["blocks"])


def deepen_spec(spec: ArchSpec, stage: int) -> ArchSpec:
    body = _copy(spec.body)
    body["stages"][stage]["blocks"].append(body["stages"][stage]["blocks"][-1])
    return _spec(spec, body)


def init_new_layer(model: nn.Module, stage: int) -> None:
    """The appended block adds y = BN(project(...)) with BN weight and bias 0, so it is the
    identity; the BN weight gets a gradient at the first step and the block starts to learn."""
    with torch.no_grad():
        bn = model.stages[stage][-1].project.bn
        bn.weight.zero_()
        bn.bias.zero_()
