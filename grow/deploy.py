"""Deploy a grown model: an ONNX, torch.export (.pt2) or TorchScript file, verified before it is trusted.

Exports are where grown and pruned networks break (a shape the exporter did not expect, a
normalisation left behind), so no file appears under its name until it has been run in its own
runtime and its logits compared with the PyTorch model's, on random images and on real test
images of the model's dataset when they are on this machine. The comparison is stored next to
the file (FILE.verify.json). The normalisation is inside the model, so every exported file takes
the same input as the model: float32 NCHW images in [0, 1].

export.py stays the JSON + safetensors format; this module is only about running elsewhere.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from grow.errors import GrowError
from grow.fileio import write_json

FORMATS = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
RUNTIME_OF = {"onnx": "onnxruntime", "pt2": "pt2", "torchscript": "torchscript"}
FORMAT_OF_RUNTIME = {runtime: fmt for fmt, runtime in RUNTIME_OF.items()}
LOADER = {"onnx": "onnxruntime", "pt2": "torch.export.load", "torchscript": "torch.jit.load"}
# Opset 18 runs in every onnxruntime since 1.14 (2023), onnxruntime-web included.
ONNX_OPSET = 18
# Largest |exported - PyTorch| logit difference, relative to the largest |PyTorch| logit.
TOLERANCE = 1e-4
# Optional packages per format and the extra that installs them.
NEEDS = {"onnx": ("onnx", "onnxruntime", "onnxscript")}
RANDOM_IMAGES = 64
DYNAMIC_CHUNKS = (1, 7, 56)  # a dynamic-batch file is checked at several batch sizes, 1 among them
# TorchScript is deprecated upstream; we offer it on purpose, for runtimes that only read it.
_JIT_DEPRECATED = r".*torch\.jit\.\w+` is deprecated"


class ExportError(GrowError):
    """An export that failed, or whose file does not compute what the PyTorch model computes."""


@dataclass
class ExportResult:
    """What `export_model` wrote and how well the file agrees with the PyTorch model."""

    path: Path
    format: str
    batch: Optional[int]  # None: any batch size
    method: str
    verification: dict
    latency: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"file": str(self.path), "format": self.format, "batch": self.batch or "dynamic",
                "method": self.method, "input": "float32 NCHW images in [0, 1] (the model normalises them)",
                "verification": self.verification, "latency": [lat.to_dict() for lat in self.latency],
                "torch": torch.__version__}

    @property
    def verify_path(self) -> Path:
        return verify_path(self.path)

    def summary_lines(self) -> list[str]:
        from grow.latency import machine_note

        v = self.verification
        size = self.path.stat().st_size / 1024
        lines = [f"exported {self.path} ({self.method}, batch {self.batch or 'dynamic'}, {size:.0f} KB)",
                 f"verified with {LOADER[self.format]} against the PyTorch model on {v['inputs']}: "
                 f"max abs diff {v['max_abs_diff']:.2g}, max rel diff {v['max_rel_diff']:.2g} "
                 f"(tolerance {v['tolerance']:g}), argmax agrees {v['argmax_agree']}/{v['count']}"]
        if v.get("images_skipped"):
            lines.append(f"  real images skipped: {v['images_skipped']}")
        if self.latency:
            lat0 = self.latency[0]
            lines.append(f"latency on this CPU, {_threads(lat0.threads)}, median of {lat0.repeats} repeats:")
            lines += [f"  {lat.runtime:<12} {lat.describe()}" for lat in self.latency]
            note = machine_note(self.latency)
            lines += [f"  note: {note}"] if note else []
        lines.append(f"verification: {self.verify_path}")
        return lines


def _threads(n: int) -> str:
    return f"{n} thread" + ("s" if n != 1 else "")


def verify_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".verify.json")


def format_of(path: str | Path) -> str:
    """The format of an exported file, from its name."""
    name = Path(path).name
    for fmt, suffix in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise GrowError(f"cannot tell the format of {path}: expected a name ending in {', '.join(FORMATS.values())}")


def require(fmt: str) -> None:
    """One line naming the extra to install when a format's optional packages are missing."""
    for package in NEEDS.get(fmt, ()):
        try:
            importlib.import_module(package)
        except ImportError:
            raise GrowError(f"{fmt} export needs the optional package {package!r}; "
                            f"install it with: pip install -e \".[{fmt}]\"") from None


def export_model(model_or_path: nn.Module | str | Path, format: str, out: Optional[str | Path] = None, *,
                 batch: Optional[int] = None, dynamic_batch: bool = False, dataset: Optional[str] = None,
                 data_dir: Optional[str] = None, tolerance: float = TOLERANCE, latency: bool = True,
                 repeats: int = 15) -> ExportResult:
    """Export a grown model (a module, or its model.json / run folder) to `format`, verified.

    format: onnx (torch.onnx.export, opset 18), pt2 (torch.export; loads with torch.export.load in
    a process that has never imported grow) or torchscript (torch.jit.script, or a trace where the
    Python does not script). The file takes a fixed batch (`batch`, default 1) or any batch
    (`dynamic_batch`). Before the file appears at `out` (default: beside model.json) its logits are
    compared with the model's on random images and on up to 64 test images of `dataset` (default:
    model.json's dataset) when they can be read; a relative difference above `tolerance` raises
    ExportError and leaves no file. With `latency`, PyTorch eager and the file's runtime are timed.
    """
    if format not in FORMATS:
        raise GrowError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if batch is not None and batch < 1:
        raise GrowError(f"the batch size must be at least 1, got {batch}")
    if batch is not None and dynamic_batch:
        raise GrowError("give a fixed batch or a dynamic batch, not both")
    require(format)
    model, record = _cpu_model(model_or_path)
    target = _target(out, record, format)
    batch = None if dynamic_batch else (batch or 1)
    metrics = record.get("metrics") or {}
    images, skipped = real_images(dataset or metrics.get("dataset"), data_dir, model, storage=metrics.get("storage"))
    with _staged(target) as staged:
        method = _export(model, format, staged, batch)
        verification = verify_export(staged, model, format=format, batch=batch, images=images, tolerance=tolerance)
    verification["images_skipped"] = skipped
    result = ExportResult(target, format, batch, method, verification)
    if latency:
        from grow.latency import measure_latency
        sizes = (batch,) if batch else (1, 64)
        result.latency = (measure_latency(model, batch_sizes=sizes, repeats=repeats)
                          + measure_latency(target, model.spec.input_shape, sizes, repeats=repeats))
    write_json(verify_path(target), result.to_dict())
    return result


@contextlib.contextmanager
def _staged(target: Path) -> Iterator[Path]:
    """A path with `target`'s name in a temporary folder beside it, moved onto `target` in one step
    on success and removed otherwise: a file under the target name is always a verified one, and
    the exporters and loaders see the file name they expect (torch.export wants .pt2)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.", dir=target.parent) as folder:
        staged = Path(folder) / target.name
        yield staged
        os.replace(staged, target)


def _cpu_model(model_or_path) -> tuple[nn.Module, dict]:
    """A CPU copy in eval mode (the caller's module keeps its device and mode) and its model.json."""
    if isinstance(model_or_path, nn.Module):
        if not hasattr(model_or_path, "spec"):
            raise GrowError("export_model takes a grown model (a module with .spec) or a model.json path")
        return copy.deepcopy(model_or_path).cpu().eval(), {}
    from grow.export import load_model, read_model_json
    return load_model(model_or_path), read_model_json(model_or_path)


def _target(out, record: dict, format: str) -> Path:
    """`out`, which must name the format (so the file can be re-verified and timed from its name alone),
    or model.<suffix> beside model.json."""
    if out is not None:
        if not str(out).endswith(FORMATS[format]):
            raise GrowError(f"the {format} file's name must end in {FORMATS[format]}, got {out}")
        return Path(out)
    if not record:
        raise GrowError("give an output file (out=...) when exporting a module")
    return Path(record["_path"]).with_name("model" + FORMATS[format])


def _example(model: nn.Module, batch: Optional[int]) -> torch.Tensor:
    # A dynamic batch is traced at 2: torch.export specialises a dimension whose example is 1.
    return torch.rand(batch or 2, *model.spec.input_shape, generator=torch.Generator().manual_seed(0))


def _export(model: nn.Module, fmt: str, path: Path, batch: Optional[int]) -> str:
    """Write `model` to `path` in `fmt`; the method used, in words. Exporter failures become one line."""
    exporters = {"onnx": _export_onnx, "pt2": _export_pt2, "torchscript": _export_torchscript}
    try:
        with torch.no_grad():
            return exporters[fmt](model, path, _example(model, batch), batch is None)
    except Exception as err:  # the exporters raise many types; the user needs the first line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"{fmt} export failed: {first}") from err


def _batch_dim(dynamic: bool):
    return ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic else None


def _export_onnx(model, path, example, dynamic) -> str:
    torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
                      external_data=False, input_names=["images"], output_names=["logits"],
                      dynamic_shapes=_batch_dim(dynamic))
    import onnx
    onnx.checker.check_model(str(path), full_check=True)
    return f"torch.onnx.export, opset {ONNX_OPSET}, onnx checker passed"


def _export_pt2(model, path, example, dynamic) -> str:
    torch.export.save(torch.export.export(model, (example,), dynamic_shapes=_batch_dim(dynamic)), str(path))
    return "torch.export"


def _export_torchscript(model, path, example, dynamic) -> str:
    """Script keeps any control flow; where the Python does not script (vgg's zip over its stages
    and a list of pooling flags), a trace. Our families branch on the architecture only, never on
    the data, so the trace is the same function; verification checks it, at several batch sizes
    when the batch is dynamic."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=FutureWarning)
        try:
            module, method = torch.jit.script(model), "torch.jit.script"
        except Exception:  # script raises RuntimeError or its frontend errors for Python it cannot compile
            module, method = torch.jit.trace(model, example), "torch.jit.trace"
        torch.jit.save(module, str(path))
    return method


def open_exported(path: str | Path, fmt: Optional[str] = None, *, threads: Optional[int] = None
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """Load an exported file into its runtime: a function float images -> logits (CPU tensors)."""
    fmt = fmt or format_of(path)
    require(fmt)
    if fmt == "onnx":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED, category=FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


@torch.no_grad()
def verify_export(path: str | Path, model: nn.Module, *, format: Optional[str] = None, batch: Optional[int] = None,
                  images: Optional[torch.Tensor] = None, tolerance: float = TOLERANCE) -> dict:
    """Run the exported file and the model on the same inputs; raise ExportError beyond `tolerance`.

    Inputs: 64 random images in [0, 1] and `images` (real ones), in batches of `batch`, or for a
    dynamic file (batch None) in batches of 1, 7 and 56. Returns the figures that go in the
    verification JSON: max absolute and relative difference of the logits, argmax agreement."""
    fmt = format or format_of(path)
    try:
        forward = open_exported(path, fmt)
    except GrowError:
        raise
    except Exception as err:  # a corrupt file: onnxruntime, torch.export and torch.jit raise their own errors
        raise ExportError(f"{path} could not be loaded as {fmt}: {str(err).strip().splitlines()[0]}") from None
    model = model.eval()
    shape = tuple(model.spec.input_shape)
    random = torch.rand(max(RANDOM_IMAGES, batch or 0), *shape, generator=torch.Generator().manual_seed(1))
    inputs = [random] + ([images] if images is not None and len(images) else [])
    stats = [_compare(forward, model, x, batch) for x in inputs]
    count = sum(s[3] for s in stats)
    result = {"max_abs_diff": max(s[0] for s in stats), "max_rel_diff": max(s[1] for s in stats),
              "argmax_agree": sum(s[2] for s in stats), "count": count, "tolerance": tolerance,
              "inputs": f"{stats[0][3]} random images" + (f" and {stats[1][3]} test images" if len(stats) > 1 else ""),
              "batches": [batch] if batch else list(DYNAMIC_CHUNKS), "runtime": RUNTIME_OF[fmt]}
    if not result["max_rel_diff"] <= tolerance:  # also catches NaN
        raise ExportError(f"{fmt} file disagrees with the PyTorch model: max rel diff {result['max_rel_diff']:.3g} "
                          f"> tolerance {tolerance:g} (max abs diff {result['max_abs_diff']:.3g}, argmax agrees "
                          f"{result['argmax_agree']}/{count})")
    return result


def _chunks(x: torch.Tensor, batch: Optional[int]) -> Iterator[torch.Tensor]:
    """Fixed batch: consecutive batches of that size (a remainder is dropped). Dynamic: sizes 1, 7, 56 in turn."""
    start, k = 0, 0
    while True:
        size = batch or DYNAMIC_CHUNKS[k % len(DYNAMIC_CHUNKS)]
        if start + size > len(x):
            return
        yield x[start:start + size]
        start, k = start + size, k + 1


def _compare(forward, model, x: torch.Tensor, batch: Optional[int]) -> tuple[float, float, int, int]:
    max_abs, max_ref, agree, count = 0.0, 0.0, 0, 0
    for chunk in _chunks(x.contiguous(), batch):
        ref = model(chunk)
        try:
            got = torch.as_tensor(forward(chunk)).to(ref.dtype)
        except Exception as err:  # each runtime raises its own type, e.g. for a batch size the file does not take
            raise ExportError(f"running the exported file on a batch of {len(chunk)} failed: "
                              f"{str(err).strip().splitlines()[0]}") from None
        if got.shape != ref.shape:
            raise ExportError(f"the exported file gives logits of shape {tuple(got.shape)}, "
                              f"the model {tuple(ref.shape)}")
        max_abs = max(max_abs, (got - ref).abs().max().item())
        max_ref = max(max_ref, ref.abs().max().item())
        agree += int((got.argmax(1) == ref.argmax(1)).sum())
        count += len(chunk)
    return max_abs, max_abs / max(max_ref, 1e-12), agree, count


def real_images(dataset: Optional[str], data_dir: Optional[str], model: nn.Module, count: int = 64,
                storage: Optional[str] = None) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """Up to `count` test images of `dataset` as [0, 1] floats, or None and why not (never downloads).
    `storage`: how the model's run read a folder dataset (model.json's metrics.storage)."""
    from grow.data import Batches, DataError, load_dataset
    from grow.stream import read_like_training

    if not dataset:
        return None, "no dataset named (model.json has no metrics.dataset)"
    try:
        splits = load_dataset(dataset, data_dir, download=False, val_fraction=0.0,
                              **read_like_training(dataset, model.spec, storage))
    except DataError as err:
        return None, str(err)
    if tuple(splits.info.input_shape) != tuple(model.spec.input_shape):
        return None, f"{dataset} images are {tuple(splits.info.input_shape)}, the model takes {model.spec.input_shape}"
    if not len(splits.test):
        return None, f"{dataset} has no test images"
    first = splits.test.subset(torch.arange(min(count, len(splits.test))))  # in memory, or pictures on disk
    return next(iter(Batches(first, count, info=splits.info, train=False)))[0], None


@contextlib.contextmanager
def temporary_export(model: nn.Module, fmt: str) -> Iterator[Path]:
    """Export `model` (any batch size, verified on random images) to a file that is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="grow-export-") as folder:
        path = Path(folder) / ("model" + FORMATS[fmt])
        export_model(model, fmt, path, dynamic_batch=True, latency=False)
        yield path
