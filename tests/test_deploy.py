"""Deploying a grown model: each format round-trips and loads without grow, mismatches are errors,
latency comes with its spread."""
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from grow.deploy import FORMATS as SUFFIX, ExportError, export_model, verify_export
from grow.cli import main
from grow.data import DEBIAN_FASHION_MNIST
from grow.errors import GrowError
from grow.export import save_model
from grow.latency import Latency, machine_note, measure_latency
from grow.morph import deepen, units, widen
from grow.spec import build
from search_spaces import get
from search_spaces.vgg import VGG
from tests.helpers import run_cli

SHAPE = (3, 16, 16)
NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}
HAS_ONNX = all(importlib.util.find_spec(p) for p in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason='onnx, onnxruntime, onnxscript not installed: pip install -e ".[onnx]"')
FORMATS = [pytest.param("onnx", marks=needs_onnx), "pt2", "torchscript"]

# Loads each exported file in its own runtime, in a process that never imports grow.
LOADER = """
import sys, numpy as np, torch
x = torch.from_numpy(np.load(sys.argv[1]))
outs = {}
for path in sys.argv[2:]:
    if path.endswith(".onnx"):
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        outs[path] = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    elif path.endswith(".pt2"):
        outs[path] = torch.export.load(path).module()(x).detach().numpy()
    else:
        outs[path] = torch.jit.load(path).eval()(x).detach().numpy()
assert not any(m.split(".")[0] in ("grow", "search_spaces") for m in sys.modules), "grow was imported"
np.savez(sys.argv[1] + ".out.npz", **{str(i): outs[p] for i, p in enumerate(sys.argv[2:])})
"""


def grown(family: str) -> torch.nn.Module:
    """A seed that went through one split widening and one deepening, with non-trivial BatchNorm statistics."""
    model = build(get(family).seed(SHAPE, 10, NORM))
    first = units(model)[0]
    model = deepen(widen(model, {first.name: first.width + 4}, init="split"), 0)
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=gen))
    return model.eval()


def saved(tmp_path, family: str):
    model = grown(family)
    save_model(model, tmp_path / family)
    return model, tmp_path / family / "model.json"


FAMILIES = ["vgg", "resnet", "mobilenet"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each family's grown model, exported (dynamic batch) to every format whose packages are here."""
    tmp = tmp_path_factory.mktemp("exports")
    found = {}
    for family in FAMILIES:
        model, path = saved(tmp, family)
        found[family] = (model, {fmt: export_model(path, fmt, dynamic_batch=True, latency=False)
                                 for fmt in ["pt2", "torchscript"] + (["onnx"] if HAS_ONNX else [])})
    return tmp, found


@pytest.mark.parametrize("family", FAMILIES)
def test_every_format_round_trips(exported, family):
    for fmt, result in exported[1][family][1].items():
        assert result.path.exists() and result.verification["max_rel_diff"] <= 1e-4, fmt
        stored = json.loads(result.verify_path.read_text())
        assert stored["verification"]["argmax_agree"] == stored["verification"]["count"] == 64
        assert stored["verification"]["batches"] == [1, 7, 56]
        assert "no dataset" in stored["verification"]["images_skipped"]


def test_exported_files_load_and_match_in_a_process_without_grow(exported):
    tmp, found = exported
    x = torch.rand(5, *SHAPE)
    np.save(tmp / "x.npy", x.numpy())
    files = [(family, fmt, str(result.path)) for family, (_, results) in found.items() for fmt, result in results.items()]
    proc = subprocess.run([sys.executable, "-I", "-c", LOADER, str(tmp / "x.npy"), *[f[2] for f in files]],
                          cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    outs = np.load(str(tmp / "x.npy") + ".out.npz")
    for i, (family, fmt, _) in enumerate(files):
        with torch.no_grad():
            ref = found[family][0](x).numpy()
        assert np.abs(outs[str(i)] - ref).max() <= 1e-4 * np.abs(ref).max(), (family, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fixed_batch_file_is_checked_at_that_batch(tmp_path, fmt):
    model = grown("mobilenet")
    result = export_model(model, fmt, tmp_path / ("m" + SUFFIX[fmt]), batch=4, latency=False)
    assert result.batch == 4 and result.verification["batches"] == [4]
    assert result.verification["count"] == 64


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_test_images_of_the_model_dataset_are_checked(tmp_path):
    model = build(get("vgg").seed((1, 28, 28), 10, {"mean": [0.29], "std": [0.35]}))
    save_model(model, tmp_path, metrics={"dataset": "fashion-mnist"})
    result = export_model(tmp_path / "model.json", "pt2", latency=False)
    assert result.verification["inputs"] == "64 random images and 64 test images"
    assert result.verification["count"] == 128 and result.verification["images_skipped"] is None


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_corrupted_file_is_an_error(tmp_path):
    model = grown("resnet")
    path = export_model(model, "torchscript", tmp_path / "m.torchscript.pt", latency=False).path
    scripted = torch.jit.load(str(path))
    with torch.no_grad():
        scripted.classifier.bias.add_(0.5)
    torch.jit.save(scripted, str(path))
    with pytest.raises(ExportError, match="disagrees with the PyTorch model"):
        verify_export(path, model, batch=1)


@needs_onnx
def test_a_corrupted_onnx_weight_is_an_error(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = grown("vgg")
    path = export_model(model, "onnx", tmp_path / "m.onnx", latency=False).path
    proto = onnx.load(str(path))
    weight = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(proto, str(path))
    with pytest.raises(ExportError, match="max rel diff"):
        verify_export(path, model, batch=1)


class NoisyVGG(VGG):
    """A model whose output is not a function of its input: no export of it can be verified."""

    def forward(self, x):
        return super().forward(x) + torch.randn(x.shape[0], self.spec.num_classes)


def test_an_export_that_does_not_match_leaves_no_file(tmp_path):
    model = NoisyVGG(get("vgg").seed(SHAPE, 10))
    target = tmp_path / "noisy.pt2"
    with pytest.raises(ExportError, match="disagrees"):
        export_model(model, "pt2", target, latency=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_optional_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` meets when it is not installed
    with pytest.raises(GrowError, match=r'pip install -e "\.\[onnx\]"'):
        export_model(grown("vgg"), "onnx", tmp_path / "m.onnx")


def test_export_from_the_command_line(tmp_path):
    _, path = saved(tmp_path, "vgg")
    proc = run_cli("export", str(path), "--format", "torchscript", "--batch", "2", "--no-latency")
    assert proc.returncode == 0, proc.stderr
    assert "verified with torch.jit.load" in proc.stdout and "argmax agrees 64/64" in proc.stdout
    assert (path.parent / "model.torchscript.pt.verify.json").exists()


@pytest.mark.parametrize("args, fragment", [
    (["/no/such/model.json", "--format", "pt2"], "/no/such/model.json"),
    (["{model}", "--format", "tflite"], "tflite"),
    (["{model}", "--format", "pt2", "--batch", "0"], "batch"),
    (["{model}", "--format", "onnx", "--out", "{model}.bin"], "must end in .onnx"),
    (["{model}", "--format", "pt2", "--batch", "2", "--dynamic-batch"], "--dynamic-batch"),
])
def test_bad_export_requests_are_one_line(tmp_path, capsys, args, fragment):
    _, path = saved(tmp_path, "vgg")
    try:
        code = main(["export", *[a.format(model=path) for a in args]])
    except SystemExit as stop:  # argparse's usage errors
        code = stop.code
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not list(path.parent.glob("model.pt2*"))


def test_latency_is_a_median_with_its_spread():
    model = grown("resnet")
    lats = measure_latency(model, batch_sizes=(1, 4), repeats=5, warmup=1)
    assert [lat.batch for lat in lats] == [1, 4] and {lat.runtime for lat in lats} == {"eager"}
    for lat in lats:
        assert lat.min_ms <= lat.q1_ms <= lat.median_ms <= lat.q3_ms <= lat.max_ms
        assert lat.threads == torch.get_num_threads() and lat.repeats == 5
    assert model.training is False


def test_latency_of_an_exported_runtime():
    (lat,) = measure_latency(grown("vgg"), batch_sizes=(3,), runtime="torchscript", repeats=3)
    assert lat.runtime == "torchscript" and lat.median_ms > 0


def test_wide_spread_says_the_machine_looks_busy():
    steady = Latency("eager", 1, 1.0, 0.98, 1.02, 0.95, 1.1, 15, 10, 1)
    noisy = Latency("eager", 1, 1.0, 0.7, 1.6, 0.5, 140.0, 15, 10, 1)
    assert not steady.busy and noisy.busy
    assert "busy" in machine_note([noisy]) and "worst 90%" in machine_note([steady, noisy])


def test_show_times_other_runtimes_on_request(tmp_path):
    from grow.inspect import summarize_model
    _, path = saved(tmp_path, "resnet")
    info = summarize_model(str(path), batch_size=4, runtimes=["torchscript"])
    assert list(info["other_runtimes"]) == ["torchscript"] and "for one image" in info["other_runtimes"]["torchscript"]
    assert [(lat["runtime"], lat["batch"]) for lat in info["latency"]] == [
        ("eager", 1), ("eager", 4), ("torchscript", 1), ("torchscript", 4)]
