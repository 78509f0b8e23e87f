"""ArchSpec: an architecture as plain data (JSON in and out); `build` turns it into a module."""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

from torch import nn


class SpecError(ValueError):
    """An architecture file or value that cannot describe a network; the message says why."""


# Sizes no real network has. A spec beyond them is a typo or a damaged file, and building it would
# try to allocate more memory than a machine has (one conv of width 10^9 asks for hundreds of GB),
# so it is refused from its closed-form costs before anything is allocated.
MAX_WIDTH = 65_536            # channels of one layer (the widest convs in use have a few thousand)
MAX_SIDE = 16_384             # pixels on a side of the input image
MAX_CLASSES = 1_000_000
MAX_LAYERS = 10_000           # conv and linear layers (ResNet-1202 has 1,202)
MAX_PARAMS = 2_000_000_000    # 8 GB of float32 weights
MAX_MACS = 10**13             # per image: 10T, ~2,500x ResNet-50 at 224x224


@dataclass
class ArchSpec:
    """A network as data: which family, its input and classes, and the family's layout (`body`).

    `normalization` ({"mean": [...], "std": [...]} per channel) is applied inside the model, so
    a built model takes float images in [0, 1].
    """

    family: str
    input_shape: tuple[int, int, int]
    num_classes: int
    body: dict
    normalization: Optional[dict] = None
    FORMAT: ClassVar[str] = "grow.arch/1"

    def __post_init__(self) -> None:
        # One canonical form (tuple shape, float statistics), so a spec equals its JSON round trip
        # and the model's normalisation buffers are floating point even for integer statistics.
        self.input_shape = tuple(self.input_shape)
        if isinstance(self.normalization, dict):
            self.normalization = {k: [float(v) for v in values] for k, values in self.normalization.items()}

    def to_dict(self) -> dict:
        return {"format": self.FORMAT, "family": self.family, "input_shape": list(self.input_shape),
                "num_classes": self.num_classes, "normalization": copy.deepcopy(self.normalization),
                "body": copy.deepcopy(self.body)}

    @classmethod
    def from_dict(cls, data: Any) -> "ArchSpec":
        """Validate `data` (as read from JSON) and make the spec; SpecError names what is wrong."""
        from search_spaces import get

        if not isinstance(data, dict):
            raise SpecError("an architecture must be a JSON object")
        check_keys(data, {"format", "family", "input_shape", "num_classes", "body", "normalization"}, "architecture")
        if data.get("format", cls.FORMAT) != cls.FORMAT:
            raise SpecError(f"architecture format {data.get('format')!r} is not {cls.FORMAT!r}")
        missing = [k for k in ("family", "input_shape", "num_classes", "body") if k not in data]
        if missing:
            raise SpecError(f"architecture is missing {', '.join(repr(k) for k in missing)}")
        shape = data["input_shape"]
        if not (isinstance(shape, list) and len(shape) == 3 and all(_positive_int(v) for v in shape)):
            raise SpecError(f"'input_shape' must be three positive integers [C, H, W], got {shape!r}")
        if not (_positive_int(data["num_classes"]) and data["num_classes"] >= 2):
            raise SpecError(f"'num_classes' must be an integer >= 2, got {data['num_classes']!r}")
        if shape[0] > MAX_WIDTH or max(shape[1:]) > MAX_SIDE or data["num_classes"] > MAX_CLASSES:
            raise SpecError(f"input_shape {shape} or num_classes {data['num_classes']} is beyond any real network "
                            f"(at most {MAX_WIDTH} channels, {MAX_SIDE} pixels a side, {MAX_CLASSES:,} classes)")
        _check_normalization(data.get("normalization"), shape[0])
        family = get(data["family"])
        if not isinstance(data["body"], dict):
            raise SpecError("'body' must be a JSON object")
        if _leaves(data["body"]) > 4 * MAX_LAYERS:
            raise SpecError(f"'body' describes more than {MAX_LAYERS:,} layers; no real network is that deep")
        family.validate(data["body"])
        spec = cls(data["family"], tuple(shape), data["num_classes"], copy.deepcopy(data["body"]),
                   copy.deepcopy(data.get("normalization")))
        check_size(spec)
        return spec

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as err:
            raise SpecError(f"architecture is not valid JSON ({err})") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        from grow.fileio import atomic_write_text
        atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpec":
        try:
            text = Path(path).read_text()
        except OSError as err:
            raise SpecError(f"cannot read architecture {path}: {err.strerror}") from None
        except UnicodeDecodeError:
            raise SpecError(f"architecture {path} is not a text (JSON) file") from None
        try:
            return cls.from_json(text)
        except SpecError as err:
            raise SpecError(f"{path}: {err}") from None


def check_keys(data: dict, allowed: set[str], where: str) -> None:
    """Refuse keys nobody reads: a misspelt key would otherwise be dropped without a word."""
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise SpecError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; "
                        f"allowed: {', '.join(sorted(allowed))}")


def check_size(spec: ArchSpec) -> None:
    """SpecError when `spec` is wider, deeper or costlier than any real network (the MAX_* limits),
    computed in closed form: nothing is allocated."""
    from search_spaces import get

    rows = get(spec.family).layers(spec)
    widest = max(max(r["in"], r["out"]) for r in rows)
    params, macs = sum(r["params"] for r in rows), sum(r["macs"] for r in rows)
    for what, value, limit in (("layers", len(rows), MAX_LAYERS), ("channels in one layer", widest, MAX_WIDTH),
                               ("parameters", params, MAX_PARAMS), ("MACs per image", macs, MAX_MACS)):
        if value > limit:
            raise SpecError(f"the architecture has {value:,} {what}, beyond any real network "
                            f"(at most {limit:,}); is a width or the depth mistyped?")


def _leaves(value: Any) -> int:
    """How many numbers a JSON body holds (bounded work before a family walks it)."""
    count, todo = 0, [value]
    while todo:
        item = todo.pop()
        if isinstance(item, (dict, list)):
            todo.extend(item.values() if isinstance(item, dict) else item)
        else:
            count += 1
    return count


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _check_normalization(norm: Any, channels: int) -> None:
    if norm is None:
        return
    ok = isinstance(norm, dict) and all(
        isinstance(norm.get(k), list) and len(norm[k]) == channels
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in norm[k])
        for k in ("mean", "std")) and set(norm) == {"mean", "std"}
    if not ok or any(v <= 0 for v in norm["std"]):
        raise SpecError(f"'normalization' must be {{'mean': [{channels} numbers], 'std': [{channels} positive numbers]}}")


def build(spec: ArchSpec) -> nn.Module:
    """The nn.Module for `spec` (fresh initialisation); it carries the spec as `.spec`."""
    from search_spaces import get
    check_size(spec)
    return get(spec.family).build(spec)
