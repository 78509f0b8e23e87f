"""Look at a grown model: per-layer costs with measured latency (`show`), test accuracy (`eval`)."""
from __future__ import annotations

import statistics
import time
from typing import Optional

import torch
from torch import nn

from grow.cost import count_macs, count_params, layer_costs
from grow.export import load_model


@torch.no_grad()
def measure_latency(model: nn.Module, batch_size: int = 1, repeats: int = 20,
                    device: str | torch.device = "cpu") -> float:
    """Median seconds per forward pass of a batch of `batch_size` random images on `device`."""
    model = model.to(device).eval()
    x = torch.rand(batch_size, *model.spec.input_shape, device=device)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(x)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def summarize_model(path: str, batch_size: int = 64) -> dict:
    """Per-layer MACs/params and the whole model's measured latency on this machine's CPU."""
    model = load_model(path)
    spec = model.spec
    return {
        "space": spec.family, "input_shape": list(spec.input_shape), "num_classes": spec.num_classes,
        "macs": count_macs(spec), "params": count_params(spec), "layers": layer_costs(spec),
        "latency_ms_batch1": 1e3 * measure_latency(model, 1),
        "latency_ms_per_image": 1e3 * measure_latency(model, batch_size, repeats=5) / batch_size,
        "threads": torch.get_num_threads(), "batch_size": batch_size,
    }


def show_model(path: str, batch_size: int = 64, console=None) -> dict:
    """Print the per-layer table of a grown model and its measured latency; return the numbers."""
    from rich.console import Console
    from rich.table import Table

    from grow.report import human

    info = summarize_model(path, batch_size)
    console = console or Console()
    table = Table(title=f"{info['space']} {tuple(info['input_shape'])} -> {info['num_classes']} classes",
                  title_justify="left")
    for col in ("layer", "kind", "in", "out", "kernel", "stride", "output", "MACs", "params", "share of MACs"):
        table.add_column(col, justify="left" if col in ("layer", "kind") else "right")
    for row in info["layers"]:
        table.add_row(row["name"], row["kind"], str(row["in"]), str(row["out"]), str(row.get("kernel", "")),
                      str(row.get("stride", "")), str(row.get("output", "")), human(row["macs"]),
                      human(row["params"]), f"{row['macs'] / max(info['macs'], 1):.1%}")
    console.print(table)
    console.print(
        f"total {human(info['macs'])} MACs ({human(2 * info['macs'])} FLOPs), {human(info['params'])} params | "
        f"measured on this CPU ({info['threads']} threads): {info['latency_ms_batch1']:.2f} ms for one image, "
        f"{info['latency_ms_per_image']:.3f} ms per image in batches of {info['batch_size']} "
        "(MACs and latency differ: memory traffic, depthwise convs and small layers cost more than their MACs)")
    return info


def evaluate_model(path: str, dataset: str, data_dir: Optional[str] = None, *, device: str = "auto",
                   download: bool = True) -> dict:
    """Test-split accuracy of a grown model on `dataset`."""
    from grow.controller import resolve_device
    from grow.data import Batches, load_dataset
    from grow.errors import GrowError
    from grow.train import evaluate

    dev = resolve_device(device)
    model = load_model(path, map_location=dev)
    splits = load_dataset(dataset, data_dir, download=download)
    if tuple(splits.info.input_shape) != tuple(model.spec.input_shape) or splits.info.num_classes != model.spec.num_classes:
        raise GrowError(
            f"the model takes {tuple(model.spec.input_shape)} images in {model.spec.num_classes} classes, "
            f"but {dataset} has {tuple(splits.info.input_shape)} images in {splits.info.num_classes} classes")
    loss, acc = evaluate(model, Batches(splits.test, 512, info=splits.info, train=False, device=dev))
    return {"dataset": splits.info.name, "accuracy": acc, "loss": loss, "images": len(splits.test.labels)}
