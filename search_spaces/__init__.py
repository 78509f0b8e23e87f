"""Network families that grow can build and grow: a registry by name."""
from __future__ import annotations

from types import ModuleType


def _families() -> dict[str, ModuleType]:
    from search_spaces import vgg
    found = {"vgg": vgg}
    try:
        from search_spaces import resnet
        found["resnet"] = resnet
    except ImportError:
        pass
    try:
        from search_spaces import mobilenet
        found["mobilenet"] = mobilenet
    except ImportError:
        pass
    return found


def names() -> list[str]:
    return list(_families())


def get(name: str) -> ModuleType:
    """The family module `name`; SpecError listing the known ones otherwise."""
    families = _families()
    if name not in families:
        from grow.spec import SpecError
        raise SpecError(f"unknown network family {name!r}; known: {', '.join(families)}")
    return families[name]
