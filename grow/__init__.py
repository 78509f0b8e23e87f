"""grow: grow compact convolutional networks along the DessiLBI path.

The public names are imported lazily, so `import grow` (and `grow.load_model`) costs only
torch: the tuner, the rich display and the plots load when they are first used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "DessiLBI": "grow.optim",
    "ArchSpec": "grow.spec",
    "SpecError": "grow.spec",
    "build": "grow.spec",
    "count_macs": "grow.cost",
    "count_params": "grow.cost",
    "measure_macs": "grow.cost",
    "layer_costs": "grow.cost",
    "parse_count": "grow.cost",
    "Unit": "grow.morph",
    "units": "grow.morph",
    "widenable": "grow.morph",
    "widen": "grow.morph",
    "deepenable": "grow.morph",
    "deepen": "grow.morph",
    "extend": "grow.morph",
    "move_optimizer_state": "grow.morph",
    "prune": "grow.morph",
    "PruneConfig": "grow.pruning",
    "PruneResult": "grow.pruning",
    "prune_network": "grow.pruning",
    "load_dataset": "grow.data",
    "Batches": "grow.data",
    "DataError": "grow.data",
    "save_model": "grow.export",
    "load_model": "grow.export",
    "export_model": "grow.deploy",
    "verify_export": "grow.deploy",
    "measure_latency": "grow.latency",
    "Recipe": "grow.recipe",
    "train_spec": "grow.recipe",
    "scale_to_budget": "grow.baselines",
    "hand_shapes": "grow.baselines",
    "Budget": "grow.policy",
    "GrowConfig": "grow.controller",
    "GrowResult": "grow.controller",
    "GrowError": "grow.errors",
    "show_model": "grow.inspect",
    "evaluate_model": "grow.inspect",
    "grow_network": "grow.controller",
    "TuneConfig": "grow.tune",
    "run_study": "grow.tune",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grow' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
