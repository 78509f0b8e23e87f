"""The networks a practitioner would take instead of growing one: fixed shapes scaled to the budget.

A uniform baseline is a family's classic member (VGG-11, ResNet-20, MobileNetV2) or another fixed
shape with every width multiplied by one factor, the largest whose cost fits the budget. The
hand shapes are the depth/width trade-offs a practitioner tries by hand: the family's seed
topology (shallow and wide once scaled up), its classic member, and a deeper classic member
(deep and narrow at the same cost).
"""
from __future__ import annotations

from typing import Optional

import search_spaces
from grow import morph
from grow.policy import Budget, largest_factor
from grow.spec import ArchSpec
from search_spaces.common import large

# label -> member: "seed" the family's seed topology, "shallow" the family's shallow() (vgg's seed
# leaves a 3-pixel stage to growth, the hand shape keeps it), else a classic member.
HAND_SHAPES = {
    "vgg": {"shallow": "shallow", "classic": "vgg11", "deep": "vgg16"},
    "resnet": {"shallow": "seed", "classic": "resnet20", "deep": "resnet32"},
    "mobilenet": {"shallow": "seed", "classic": "mobilenetv2"},
}
# Above 64 pixels (search_spaces.common.STRIDED_FROM) a practitioner takes the ImageNet members.
LARGE_HAND_SHAPES = {**HAND_SHAPES, "resnet": {"shallow": "seed", "classic": "resnet18", "deep": "resnet34"}}


def width_factor(spec: ArchSpec, budget: Budget, *, max_factor: float = 64.0) -> float:
    """The largest factor by which every width of `spec` can be multiplied with its MACs and
    parameters within `budget` (grow.policy.largest_factor)."""
    family = search_spaces.get(spec.family)
    if not budget.fits(family.scale(spec, 1e-3)):
        raise ValueError(f"even the narrowest {spec.family} of this shape exceeds the budget")
    return largest_factor(lambda f: budget.fits(family.scale(spec, f)), 1e-3, max_factor)


def scale_to_budget(spec: ArchSpec, budget: Budget) -> ArchSpec:
    """`spec` with every width times `width_factor(spec, budget)`: the widest uniform scaling that fits."""
    return search_spaces.get(spec.family).scale(spec, width_factor(spec, budget))


def hand_shapes(family_name: str, input_shape, num_classes: int,
                normalization: Optional[dict] = None) -> dict[str, ArchSpec]:
    """The fixed shapes of HAND_SHAPES (LARGE_HAND_SHAPES for large inputs) for `family_name`, unscaled."""
    family = search_spaces.get(family_name)
    shapes = {}
    table = LARGE_HAND_SHAPES if large(input_shape) else HAND_SHAPES
    for label, member in table[family_name].items():
        if member in ("seed", "shallow"):  # a family's own shallow shape, where its seed leaves stages to growth
            shapes[label] = getattr(family, member)(input_shape, num_classes, normalization=normalization)
        else:
            shapes[label] = family.classic(member, input_shape, num_classes, normalization=normalization)
    return shapes


def _share_of(budget: Budget, fraction: float) -> Budget:
    """`fraction` of each limit the budget sets."""
    return Budget(None if budget.macs is None else int(budget.macs * fraction),
                  None if budget.params is None else int(budget.params * fraction))


def small_seed(family_name: str, input_shape, num_classes: int, budget: Budget, share: float,
               normalization: Optional[dict] = None) -> ArchSpec:
    """The family's small seed, every width narrowed by one factor to `share` of the budget where the
    budget cannot pay for the seed with the new stage growth would add to it (or for the seed alone).

    A seed that takes most of the budget leaves growth nothing to decide: resnet's seed costs 79% of 3M
    MACs on 28x28 pictures, could not add a stage, and grew into a network 0.4 below ResNet-20 scaled;
    narrowed, it grew two stages and led by 0.9 (bench/RESULTS.md, seventeenth wave). Where the new stage
    fits, the seed stays: narrowing vgg's seed at 2M MACs on 32x32 pictures (55% of the budget) lost 0.6-1.2
    points. Where even the narrowest seed does not fit, it is returned as it is and the caller reports it."""
    seed = search_spaces.get(family_name).seed(input_shape, num_classes, normalization=normalization)
    extended = morph.extended_spec(seed)
    if budget.fits(extended if extended is not None else seed):
        return seed
    part = _share_of(budget, share)
    if part.fits(seed):
        return seed
    try:
        return scale_to_budget(seed, part)
    except ValueError:
        return seed


def classic_seed(family_name: str, input_shape, num_classes: int, budget: Budget, fraction: float,
                 normalization: Optional[dict] = None) -> ArchSpec:
    """The family's classic member (the shape a practitioner would scale) narrowed to `fraction`
    of the budget: a seed with the classic member's depth, whose widths growth then allocates."""
    classic = hand_shapes(family_name, input_shape, num_classes, normalization)["classic"]
    return scale_to_budget(classic, _share_of(budget, fraction))
