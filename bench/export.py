"""MACs next to measured latency in each runtime: where MACs stop predicting speed.

    python bench/export.py                      # classic members at 3x32x32 + a quickly grown model
    python bench/export.py --model runs/fm      # your grown models instead of the quick one
    python bench/export.py --scale 0.5 --batch 8 --repeats 7

For VGG-11, ResNet-20 and MobileNetV2 (CIFAR layouts, widths times --scale) and grown models,
each runtime (PyTorch eager, ONNX Runtime, the torch.export program, TorchScript) gets the same
random [0, 1] images: batch 1 and a batch of --batch, median of --repeats after warm-up, on
--threads CPU threads. Every exported file is verified against PyTorch before it is timed.
Without --model, a grown model comes from a 3-round growth run on the synthetic set (about half a
minute). Prints a Markdown table (and writes --json).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grow.controller import grow_network  # noqa: E402
from grow.cost import count_macs, count_params  # noqa: E402
from grow.export import load_model, read_model_json  # noqa: E402
from grow.latency import machine_note, measure_latency  # noqa: E402
from grow.report import human  # noqa: E402
from grow.spec import build  # noqa: E402
from search_spaces import get  # noqa: E402

CLASSICS = (("vgg", "vgg11"), ("resnet", "resnet20"), ("mobilenet", "mobilenetv2"))
CIFAR = (3, 32, 32)
CIFAR_NORM = {"mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]}


def classic_models(scale: float) -> list[tuple[str, torch.nn.Module]]:
    models = []
    for family, member in CLASSICS:
        spec = get(family).classic(member, CIFAR, 10, CIFAR_NORM)
        spec = get(family).scale(spec, scale) if scale != 1 else spec
        name = member if scale == 1 else f"{member} x{scale:g}"
        models.append((name, build(spec).eval()))
    return models


def quick_grown_model(folder: Path) -> tuple[str, torch.nn.Module]:
    from grow.controller import GrowConfig
    config = GrowConfig(dataset="synthetic", out=str(folder), space="vgg", budget_macs=2_000_000,
                        epochs_per_round=1, max_rounds=3, finetune_epochs=1, seed=0, device="cpu")
    result = grow_network(config)
    return "grown vgg (synthetic, 3 rounds)", load_model(result.out / "model.json")


def grown_model(path: str) -> tuple[str, torch.nn.Module]:
    record = read_model_json(path)
    return f"grown {record['space']} ({record['metrics'].get('dataset', '?')})", load_model(path)


def runtimes() -> list[str]:
    have_onnx = all(importlib.util.find_spec(p) for p in ("onnx", "onnxruntime", "onnxscript"))
    return ["eager"] + (["onnxruntime"] if have_onnx else []) + ["pt2", "torchscript"]


def measure(name: str, model: torch.nn.Module, args) -> dict:
    row = {"model": name, "input": list(model.spec.input_shape), "macs": count_macs(model.spec),
           "params": count_params(model.spec), "runtimes": {}}
    for runtime in runtimes():
        lats = measure_latency(model, batch_sizes=(1, args.batch), runtime=runtime, repeats=args.repeats,
                               warmup=args.warmup, threads=args.threads)
        row["runtimes"][runtime] = [lat.to_dict() for lat in lats]
        row.setdefault("_lats", []).extend(lats)
        print(f"  {name:<34} {runtime:<12} " + "; ".join(lat.describe() for lat in lats), file=sys.stderr)
    return row


def table(rows: list[dict], batch: int) -> str:
    names = list(rows[0]["runtimes"])
    head = ["model", "input", "MACs", "params"] + [f"{r} b1 ms" for r in names] + \
           [f"{r} b{batch} ms/img" for r in names] + ["eager b1 ns/MAC"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        rt = row["runtimes"]
        cells = [row["model"], "x".join(map(str, row["input"])), human(row["macs"]), human(row["params"])]
        cells += [f"{rt[r][0]['median_ms']:.3g}" for r in names]
        cells += [f"{rt[r][1]['per_image_ms']:.3g}" for r in names]
        cells.append(f"{rt['eager'][0]['median_ms'] * 1e6 / row['macs']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], help="model.json or run folder (repeatable)")
    parser.add_argument("--scale", type=float, default=1.0, help="width factor of the classic members")
    parser.add_argument("--batch", type=int, default=16, help="the larger batch (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's thread count")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        models = classic_models(args.scale)
        models += [grown_model(p) for p in args.model] or [quick_grown_model(Path(folder) / "grown")]
        rows = [measure(name, model, args) for name, model in models]
    lats = [lat for row in rows for lat in row.pop("_lats")]
    threads = lats[0].threads
    print(f"CPU latency, {threads} thread{'s' * (threads != 1)}, median of {args.repeats} repeats after "
          f"{args.warmup} warm-up calls; b1: one image, b{args.batch}: per image in a batch of {args.batch}")
    print(table(rows, args.batch))
    note = machine_note(lats)
    print(f"note: {note}" if note else "the machine looked idle (small spread, load below the core count)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "note": note}, indent=2) + "\n")


if __name__ == "__main__":
    main()
