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
        _check_normalization(data.get("normalization"), shape[0])
        family = get(data["family"])
        if not isinstance(data["body"], dict):
            raise SpecError("'body' must be a JSON object")
        family.validate(data["body"])
        return cls(data["family"], tuple(shape), data["num_classes"], copy.deepcopy(data["body"]),
                   copy.deepcopy(data.get("normalization")))

    def to_json(self, indent: Optional[int] = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "ArchSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
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
    return get(spec.family).build(spec)
