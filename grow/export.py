"""Save a grown model as architecture JSON + safetensors weights, and load it back in plain PyTorch.

Nothing here unpickles: the architecture is JSON, the weights are safetensors, so loading a model
someone sent you runs no code of theirs.
"""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from grow.cost import count_macs, count_params
from grow.fileio import atomic_path, write_json
from grow.spec import ArchSpec, SpecError, build

MODEL_FORMAT = "grow.model/1"
WEIGHTS_NAME = "model.safetensors"
INPUT_CONVENTION = "float32 NCHW images scaled to [0, 1]; the model normalises them itself"


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write the state_dict (parameters and buffers) as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def load_weights(model: nn.Module, path: str | Path) -> None:
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise SpecError(f"weights file {path} does not exist") from None
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise SpecError(f"weights file {path} is not a readable safetensors file ({err})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of other shapes: another run's weights
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise SpecError(f"weights file {path} does not match the architecture ({first.rstrip('.')}); "
                        f"is it another model's weights file?") from None
    if missing or unexpected:
        raise SpecError(
            f"weights file {path} does not match the architecture "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})"
        )


def model_record(model: nn.Module, metrics: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
    """The model.json contents for `model`: its architecture plus what a user needs to use it."""
    spec: ArchSpec = model.spec
    macs = count_macs(spec)
    record: dict[str, Any] = {
        "format": MODEL_FORMAT,
        "space": spec.family,
        "input_shape": list(spec.input_shape),
        "num_classes": spec.num_classes,
        "macs": macs,
        "flops": 2 * macs,
        "params": count_params(spec),
        "input": INPUT_CONVENTION,
        "normalization": spec.normalization,
        "weights": WEIGHTS_NAME,
        "metrics": metrics or {},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": spec.to_dict(),
    }
    record.update(extra or {})
    return record


def save_model(model: nn.Module, out_dir: str | Path, *, metrics: Optional[dict] = None,
               extra: Optional[dict] = None) -> Path:
    """Write `out_dir/model.json` and `out_dir/model.safetensors`; return the JSON path."""
    out = Path(out_dir)
    save_weights(model, out / WEIGHTS_NAME)
    write_json(out / "model.json", model_record(model, metrics, extra))
    return out / "model.json"


def read_model_json(path: str | Path) -> dict:
    """Parse a model.json (or the folder holding one), with one clear error for bad files."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise SpecError(f"{path} is not valid JSON ({err})") from None
    except OSError as err:
        raise SpecError(f"cannot read {path}: {err.strerror}") from None
    if not isinstance(record, dict) or record.get("format") != MODEL_FORMAT or "arch" not in record:
        raise SpecError(f"{path} is not a grow model file (expected format {MODEL_FORMAT!r} and an 'arch' entry)")
    weights = record.get("weights", WEIGHTS_NAME)
    if not (isinstance(weights, str) and weights and Path(weights).name == weights):
        raise SpecError(f"{path}: 'weights' must name a file beside it, like {WEIGHTS_NAME!r}; got {weights!r}")
    record["_path"] = str(path)
    return record


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a grown model from its model.json (or run folder): a ready nn.Module in eval mode.

    The module takes float NCHW images in [0, 1] and normalises them itself; its architecture
    is `model.spec` (an ArchSpec with to_json()/from_json()).
    """
    record = read_model_json(path)
    spec = ArchSpec.from_dict(record["arch"])
    model = build(spec)
    load_weights(model, Path(record["_path"]).parent / record.get("weights", WEIGHTS_NAME))
    return model.to(map_location).eval()
