"""Look at a grown model: per-layer costs with measured latency (`show`), test accuracy (`eval`)."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from grow.cost import count_macs, count_params, layer_costs
from grow.export import load_model, read_model_json


def summarize_model(path: str, batch_size: int = 64, runtimes: Sequence[str] = ()) -> dict:
    """Per-layer MACs/params and the whole model's measured latency on this machine's CPU, in PyTorch
    eager and in each of `runtimes` (onnxruntime, pt2, torchscript)."""
    model = load_model(path)
    spec = model.spec
    return {
        "space": spec.family, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
        "macs": count_macs(spec), "params": count_params(spec), "layers": layer_costs(spec),
        **_latency(model, batch_size, runtimes), "batch_size": batch_size,
    }


def _latency(model: nn.Module, batch_size: int, runtimes: Sequence[str]) -> dict:
    """Latency for one image and for a batch per runtime: medians of repeats, with their spread."""
    from grow.latency import machine_note, measure_latency
    lats = {r: measure_latency(model, batch_sizes=(1, batch_size), runtime=r)
            for r in dict.fromkeys(("eager", *runtimes))}
    one, batch = lats["eager"]
    return {"latency_ms_batch1": one.median_ms, "latency_ms_per_image": batch.per_image_ms,
            "latency": [lat.to_dict() for pair in lats.values() for lat in pair], "threads": one.threads,
            "latency_text": f"{one.threads} thread{'s' * (one.threads != 1)}, median of {one.repeats} repeats: "
                            f"{one.describe()}; {batch.describe()}",
            "other_runtimes": {r: f"{a.describe()}; {b.describe()}" for r, (a, b) in lats.items() if r != "eager"},
            "machine_note": machine_note([lat for pair in lats.values() for lat in pair])}


def show_model(path: str, batch_size: int = 64, console=None, runtimes: Sequence[str] = ()) -> dict:
    """Print the per-layer table of a grown model and its measured latency; return the numbers."""
    from rich.console import Console

    from grow.report import human, layer_table

    info = summarize_model(path, batch_size, runtimes)
    console = console or Console()
    console.print(layer_table(info, console.width))
    console.print(
        f"total {human(info['macs'])} MACs ({human(2 * info['macs'])} FLOPs), {human(info['params'])} params | "
        f"measured on this CPU in PyTorch, {info['latency_text']} "
        "(MACs and latency differ: memory traffic, depthwise convs and small layers cost more than their MACs)")
    for runtime, text in info["other_runtimes"].items():
        console.print(f"  {runtime} (the model exported to a temporary, verified file): {text}")
    if info["machine_note"]:
        console.print(f"note: {info['machine_note']}")
    return info


def evaluate_model(path: str, dataset: str, data_dir: Optional[str] = None, *, device: str = "auto",
                   download: bool = True) -> dict:
    """Test-split accuracy of a grown model on `dataset`."""
    from grow.controller import resolve_device
    from grow.data import Batches, load_dataset
    from grow.errors import GrowError
    from grow.stream import read_like_training
    from grow.train import evaluate

    dev = resolve_device(device)
    model = load_model(path, map_location=dev)
    storage = (read_model_json(path).get("metrics") or {}).get("storage")
    splits = load_dataset(dataset, data_dir, download=download, **read_like_training(dataset, model.spec, storage))
    if tuple(splits.info.input_shape) != tuple(model.spec.input_shape) or splits.info.num_classes != model.spec.num_classes:
        raise GrowError(
            f"the model takes {tuple(model.spec.input_shape)} images in {model.spec.num_classes} classes, "
            f"but {dataset} has {tuple(splits.info.input_shape)} images in {splits.info.num_classes} classes")
    loss, acc = evaluate(model, Batches(splits.test, 512, info=splits.info, train=False, device=dev))
    return {"dataset": splits.info.name, "accuracy": acc, "loss": loss, "images": len(splits.test.labels)}
