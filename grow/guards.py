"""Checks made before a run trains: value types, the budget, and whether the data can teach anything.

Each failure is one GrowError sentence that names the flag or file to fix, raised before a minute of
training is spent (a config.json value of the wrong type used to surface after the first round).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Optional

from grow.errors import GrowError

MAX_SEED = 2**31  # seeds are combined with round and epoch numbers into 64-bit generator seeds
# Fewer images than this per class train a network but measure nothing: accuracies and the growth
# decisions taken on them are noise. Below it a run goes on with a note; with no images it stops.
FEW_PER_CLASS = 20


def check_types(config: Any) -> None:
    """GrowError naming the first field of a dataclass config whose value has the wrong type
    (a string lr from a hand-edited config.json or best.json, a float epoch count, NaN)."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, hint = getattr(config, field.name), hints[field.name]
        allowed = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        if not any(_is(value, t) for t in allowed):
            names = " or ".join(_type_name(t) for t in allowed)
            raise GrowError(f"{field.name.replace('_', '-')} must be {names}, got {value!r}")
    seed = getattr(config, "seed", 0)
    if not 0 <= seed < MAX_SEED:
        raise GrowError(f"seed must be between 0 and {MAX_SEED - 1}, got {seed}")


def _is(value: Any, kind: Any) -> bool:
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is str:
        return isinstance(value, str) and value.strip() != ""
    return isinstance(value, kind) if isinstance(kind, type) else True


def _type_name(kind: Any) -> str:
    return {type(None): "unset (null)", bool: "true or false", int: "a whole number", float: "a finite number",
            str: "a non-empty string"}.get(kind, getattr(kind, "__name__", str(kind)))


def check_budget(macs: Optional[int], params: Optional[int]) -> None:
    """A run needs a budget (growth stops when it is met), and one no network can reach is a typo."""
    from grow.spec import MAX_MACS, MAX_PARAMS

    if macs is None and params is None:
        raise GrowError("no budget given: grow grows a network until a budget is met; give --budget-flops "
                        "(MACs per image, e.g. 40M) and/or --budget-params (e.g. 500K)")
    for flag, value, limit in (("--budget-flops", macs, MAX_MACS), ("--budget-params", params, MAX_PARAMS)):
        if value is not None and value > limit:
            raise GrowError(f"{flag} {value:.3g} is beyond any network grow builds (at most {limit:.0e}); "
                            f"check the number and its K/M/G suffix (base 1000: 1e3M = 1G)")


def check_splits(splits: Any, note: Callable[[str], None], batch_size: Optional[int] = None) -> None:
    """Refuse data a classifier cannot learn or be measured on; `note` what only makes figures noisy."""
    info, train, val, test = splits.info, splits.train, splits.val, splits.test
    present = len(set(train.labels.tolist())) if len(train) else 0
    if info.num_classes < 2 or present < 2:
        raise GrowError(f"{info.name}: the training images fall in {present} class(es) of {info.num_classes}; "
                        "a classifier needs at least two (for imagefolder: one subfolder per class)")
    if len(val) == 0:
        raise GrowError(f"{info.name}: no validation images (each round is scored on them, and "
                        "tune ranks its trials by that score); "
                        "raise --val-fraction or add images")
    if len(test) == 0:
        raise GrowError(f"{info.name}: no test images; add images (imagefolder: a test/ or val/ folder)")
    if len(train) < FEW_PER_CLASS * info.num_classes or present < info.num_classes:
        note(f"note: only {len(train)} training images in {present} of {info.num_classes} classes and "
             f"{len(val)} validation images: accuracies and growth decisions will be noise")
    if batch_size is not None and batch_size > len(train):
        note(f"note: --batch-size {batch_size} is more than the {len(train)} training images: one step per epoch")
