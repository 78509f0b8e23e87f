"""Network families that grow can build and grow, by name.

Each family module offers: validate(body), seed(...), classic(name, ...), scale(spec, factor),
build(spec), layers(spec) (cost rows), units(spec), widen_spec, deepenable, stage_depth,
deepen_spec and init_new_layer (identity initialisation of an appended layer or block).
"""
from __future__ import annotations

from types import ModuleType

from search_spaces import mobilenet, resnet, vgg

FAMILIES: dict[str, ModuleType] = {"vgg": vgg, "resnet": resnet, "mobilenet": mobilenet}


def names() -> list[str]:
    return list(FAMILIES)


def get(name: str) -> ModuleType:
    """The family module `name`; SpecError listing the known ones otherwise."""
    if not isinstance(name, str) or name not in FAMILIES:
        from grow.spec import SpecError
        raise SpecError(f"unknown network family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]
