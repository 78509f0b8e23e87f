"""Data larger than memory: picture folders streamed through DataLoader workers, and 224x224 networks.

The end-to-end test streams a folder of 200 generated 224x224 pictures through a whole growth run
(grow, export, load); the in-memory path must still be chosen for the same folder below the threshold.
"""
import json

import numpy as np
import pytest
import torch

import grow
import search_spaces
from grow.baselines import small_seed
from grow.controller import GrowConfig
from grow.cost import count_macs, count_params, layer_costs, measure_macs
from grow.data import Batches, DataError, FirstBatches, TensorSet, load_dataset
from grow.policy import Budget
from grow.spec import ArchSpec, build
from grow.stream import FileSet, StreamBatches, plan
from tests.helpers import tiny_config


def write_pictures(root, per_class, size, classes=("ants", "bees"), fmt="JPEG", seed=0):
    """Noisy pictures whose colour says the class (red-ish vs blue-ish), `per_class` in each class folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            base = np.array([200, 60, 60] if c == 0 else [60, 60, 200], dtype=np.int16)
            pixels = base + rng.integers(-70, 70, (size, size, 3))
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.{fmt.lower()}", fmt)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """200 pictures of 224x224: 160 in train/, 40 in val/ (imagefolder's test split)."""
    root = tmp_path_factory.mktemp("photos")
    write_pictures(root / "train", 80, 224)
    write_pictures(root / "val", 20, 224, seed=1)
    return root


@pytest.fixture(scope="module")
def streamed(photos):
    """`photos` streamed: 30 MB decoded, above a 1 MB threshold."""
    return load_dataset("imagefolder", str(photos), stream_above=1_000_000, workers=0)


@pytest.fixture(scope="module")
def small_photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    write_pictures(root, 24, 40, fmt="PNG")
    return root


# --- memory or stream -------------------------------------------------------------------------------
def test_a_folder_is_held_in_memory_below_the_threshold_and_streamed_above(photos, streamed):
    decoded = 200 * 3 * 224 * 224  # 30 MB
    assert not plan("imagefolder", photos, 0, None, stream_above=decoded).streamed
    assert plan("imagefolder", photos, 0, None, stream_above=decoded - 1).streamed
    assert "within the threshold of 30.1 MB" in plan("imagefolder", photos, 0, None, stream_above=decoded).note()
    large = streamed
    assert large.info.storage == "stream" and isinstance(large.train, FileSet)
    assert large.info.storage_note == ("200 pictures (30.1 MB decoded) streamed from disk by DataLoader workers, "
                                       "above the threshold of 1 MB")
    assert large.info.input_shape == (3, 224, 224)
    assert (len(large.train), len(large.val), len(large.test)) == (144, 16, 40)
    # the model's normalisation, from a sample, centres and scales the pictures as they are evaluated
    x = torch.cat([x for x, _ in Batches(large.train, 64, info=large.info, train=False)]).transpose(0, 1).flatten(1)
    mean, std = torch.tensor(large.info.mean), torch.tensor(large.info.std)
    assert torch.allclose((x.mean(1) - mean) / std, torch.zeros(3), atol=0.05)
    assert torch.allclose(x.std(1) / std, torch.ones(3), atol=0.05)


def test_small_sets_stay_in_memory_with_the_same_splits(small_photos, monkeypatch):
    monkeypatch.setenv("GROW_STREAM_ABOVE", "1G")
    memory = load_dataset("imagefolder", str(small_photos))
    assert memory.info.storage == "memory" and isinstance(memory.train, TensorSet)
    streamed = load_dataset("imagefolder", str(small_photos), stream="on", workers=0)
    assert streamed.info.storage == "stream" and streamed.info.storage_note.endswith("as asked")
    assert streamed.info.input_shape == memory.info.input_shape == (3, 40, 40)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(streamed, name).labels, getattr(memory, name).labels)


def test_streaming_applies_to_folders_only():
    with pytest.raises(DataError, match="streaming applies to imagefolder and imagenet"):
        load_dataset("synthetic", stream="on")
    with pytest.raises(DataError, match="stream must be one of auto, on, off"):
        load_dataset("synthetic", stream="always")


# --- the batches ------------------------------------------------------------------------------------
def test_streamed_batches_present_the_batches_interface(small_photos):
    splits = load_dataset("imagefolder", str(small_photos), stream="on", image_size=32, workers=0, val_fraction=0)
    batches = Batches(splits.train, 16, info=splits.info, train=True, seed=3)
    assert isinstance(batches, StreamBatches) and len(batches) == len(splits.train) // 16
    x, y = next(iter(batches))
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert y.dtype == torch.int64 and y.shape == (16,)
    redder = x[:, 0].mean((1, 2)) > x[:, 2].mean((1, 2))
    assert torch.equal(redder, y == 0)  # each label with its own picture (class 0 is red)
    first = [y for _, y in batches]
    assert [torch.equal(a, b) for a, b in zip(first, [y for _, y in batches])] == [True] * len(batches)
    batches.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, [y for _, y in batches]))
    evaluation = Batches(splits.test, 7, info=splits.info, train=False)
    assert len(evaluation) == 2 and sum(len(y) for _, y in evaluation) == len(splits.test) == 10
    short = FirstBatches(batches, 1)  # a round of --round-steps 1: the epoch's first batch, in its order
    short.set_epoch(0)
    assert len(short) == 1 and [torch.equal(y, first[0]) for _, y in short] == [True]


def test_ranks_decode_their_slices_of_the_global_batch_whatever_the_workers(small_photos):
    """Two ranks' slices, put together, are the global batch one process draws (crops and flips
    included), and decoding in worker processes gives the same pixels as decoding in-process."""
    splits = load_dataset("imagefolder", str(small_photos), stream="on", image_size=32, workers=0, val_fraction=0)
    whole = StreamBatches(splits.train, 16, info=splits.info, train=True, seed=5, world_size=1, rank=0)
    workers = FileSet(splits.train.paths, splits.train.labels, splits.train.size, workers=2)
    halves = [StreamBatches(workers, 16, info=splits.info, train=True, seed=5, world_size=2, rank=r) for r in (0, 1)]
    for b in (whole, *halves):
        b.set_epoch(2)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *halves):
        assert len(y0) == len(y1) == 8
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_an_unreadable_picture_stops_with_its_path(small_photos, tmp_path):
    import shutil

    root = tmp_path / "broken"
    shutil.copytree(small_photos, root)
    (root / "bees" / "0.png").write_bytes(b"not a picture")
    with pytest.raises(DataError) as err:  # listing reads headers of a sample; training would read them all
        splits = load_dataset("imagefolder", str(root), stream="on", image_size=32, workers=1, val_fraction=0)
        for batch in Batches(splits.train, 4, info=splits.info, train=True):
            pass
    assert "0.png" in str(err.value) and "\n" not in str(err.value)


# --- imagenet layouts ---------------------------------------------------------------------------------
def test_imagenet_reads_class_folders_and_the_devkit_names(tmp_path):
    wnids = ("n01440764", "n01443537")
    for split, n in (("train", 6), ("val", 2)):
        write_pictures(tmp_path / split, n, 48, classes=wnids)
    plain = load_dataset("imagenet", str(tmp_path), stream="on", workers=0, val_fraction=0.25)
    assert plain.info.input_shape == (3, 224, 224) and plain.info.classes == list(wnids)
    assert (len(plain.train), len(plain.val), len(plain.test)) == (9, 3, 4)
    x, _ = next(iter(Batches(plain.test, 4, info=plain.info, train=False)))
    assert x.shape == (4, 3, 224, 224)
    # torchvision's ImageNet reader takes over when the devkit's meta.bin is there: class names
    torch.save(({"n01440764": ("tench", "Tinca tinca"), "n01443537": ("goldfish", "Carassius auratus")}, []),
               tmp_path / "meta.bin")
    named = load_dataset("imagenet", str(tmp_path), image_size=64, workers=0)
    assert named.info.classes == ["tench", "goldfish"] and named.info.input_shape == (3, 64, 64)
    assert named.info.storage == "memory"  # 64 KB of pictures


def test_imagenet_without_class_folders_in_val_says_what_to_add(tmp_path):
    write_pictures(tmp_path / "train", 2, 16, classes=("n01440764", "n01443537"))
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    with pytest.raises(DataError, match="holds no class folders; put ILSVRC2012_devkit_t12.tar.gz"):
        load_dataset("imagenet", str(tmp_path))


# --- end to end ------------------------------------------------------------------------------------------
def test_a_folder_of_224_pictures_streams_through_grow_export_and_load(photos, streamed, tmp_path, monkeypatch):
    monkeypatch.setenv("GROW_STREAM_ABOVE", "1M")  # the folder decodes to 30 MB
    config = tiny_config(tmp_path / "run", dataset="imagefolder", data_dir=str(photos), budget_macs=40_000_000,
                         max_rounds=2, batch_size=32, lr=0.05, data_workers=2)
    result = grow.grow_network(config)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["dataset"]["storage"] == "stream" and history["dataset"]["input_shape"] == [3, 224, 224]
    first = history["rounds"][0]
    assert first["spec"]["body"]["stem"] == "strided"
    seed = small_seed("vgg", IMAGENET, 2, Budget(40_000_000), GrowConfig().seed_share)
    assert first["macs"] == count_macs(seed) <= count_macs(search_spaces.get("vgg").seed(IMAGENET, 2)) < 18e6
    assert history["final"]["macs"] <= 40_000_000
    assert sum(e["images"] for e in first["epochs"]) == 128  # 144 training pictures, 4 full batches of 32
    loaded = grow.load_model(tmp_path / "run" / "model.json")
    x, y = next(iter(Batches(streamed.test, 40, info=streamed.info, train=False)))
    with torch.no_grad():
        expected = result.model.eval()(x)
        assert torch.allclose(loaded(x), expected, atol=1e-4)
    assert result.test_accuracy == pytest.approx((expected.argmax(1) == y).float().mean().item())


def test_the_cli_streams_on_request_and_refuses_it_elsewhere(small_photos, tmp_path, capsys):
    from grow.cli import main

    flags = ["--budget-flops", "2M", "--max-rounds", "1", "--finetune-epochs", "1", "--batch-size", "16", "--quiet"]
    assert main(["grow", "--dataset", "imagefolder", "--data-dir", str(small_photos), "--stream", "--data-workers", "1",
                 "--image-size", "32", *flags, "--out", str(tmp_path / "run")]) == 0
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert history["dataset"]["storage"] == "stream" and history["dataset"]["input_shape"] == [3, 32, 32]
    capsys.readouterr()
    # eval reads the folder as the run did: streamed, at the model's 32x32 (the pictures are 40x40)
    assert main(["eval", str(tmp_path / "run"), "--dataset", "imagefolder", "--data-dir", str(small_photos),
                 "--log-format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == history["test"]["accuracy"]
    assert main(["grow", "--dataset", "synthetic", "--stream", *flags, "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: streaming applies to imagefolder and imagenet; synthetic is small enough for memory"]


@pytest.mark.slow
def test_two_processes_stream_what_one_process_streams(small_photos, tmp_path):
    """Under torchrun the ranks agree on streaming (rank 0's choice) and together train the batches
    one process trains: same loss in the first round, same architectures."""
    from tests.test_distributed import torchrun
    from tests.helpers import run_cli

    flags = ["grow", "--dataset", "imagefolder", "--data-dir", str(small_photos), "--image-size", "32", "--stream",
             "--data-workers", "1", "--device", "cpu", "--budget-flops", "2M", "--epochs-per-round", "1",
             "--max-rounds", "2", "--finetune-epochs", "0", "--batch-size", "8", "--no-channels-last", "--quiet"]
    single = run_cli(*flags, "--out", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = torchrun(*flags, "--out", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr
    h1, h2 = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("one", "two"))
    assert h2["distributed"]["world_size"] == 2 and h2["dataset"]["storage"] == h1["dataset"]["storage"] == "stream"
    assert [r["spec"] for r in h1["rounds"]] == [r["spec"] for r in h2["rounds"]]
    assert abs(h1["rounds"][0]["train_loss"] - h2["rounds"][0]["train_loss"]) < 1e-3


def test_export_checks_a_model_on_the_pictures_it_was_trained_on(small_photos):
    from grow.deploy import real_images

    model = build(search_spaces.get("vgg").seed((3, 32, 32), 2))
    images, why = real_images("imagefolder", str(small_photos), model, storage="stream")
    assert why is None and images.shape == (10, 3, 32, 32) and images.dtype == torch.float32


# --- 224x224 networks ----------------------------------------------------------------------------------------
IMAGENET = (3, 224, 224)


@pytest.mark.parametrize("family, name, expected, measure", [
    ("resnet", "resnet18", 1.82e9, True), ("resnet", "resnet34", 3.67e9, False),
    ("mobilenet", "mobilenetv2", 0.30e9, True), ("vgg", "vgg11", 7.6e9, False), ("vgg", "vgg16", 15.5e9, False)])
def test_imagenet_members_cost_what_imagenet_papers_say(family, name, expected, measure):
    spec = search_spaces.get(family).classic(name, IMAGENET, 1000)
    assert count_macs(spec) == pytest.approx(expected, rel=0.05)
    if measure:
        assert measure_macs(build(spec)) == count_macs(spec)


def test_classic_seeds_for_large_inputs_scale_the_imagenet_member():
    from grow.baselines import classic_seed

    spec = classic_seed("resnet", IMAGENET, 1000, Budget(600_000_000, None), 0.15)
    assert spec.body["stem"] == "strided" and [len(s["blocks"]) for s in spec.body["stages"]] == [2, 2, 2, 2]
    assert 0.1 * 600e6 < count_macs(spec) <= 0.15 * 600e6


def test_resnet18_is_torchvisions():
    import torchvision

    spec = search_spaces.get("resnet").classic("resnet18", IMAGENET, 1000)
    theirs = torchvision.models.resnet18()
    assert count_params(spec) == sum(p.numel() for p in theirs.parameters()) == 11_689_512
    stem = layer_costs(spec)[0]
    assert (stem["kernel"], stem["stride"], stem["output"]) == (7, 2, "112x112")
    assert layer_costs(spec)[1]["output"] == "56x56"  # after the max-pool, as torchvision's layer1


@pytest.mark.parametrize("family", search_spaces.names())
def test_seeds_for_large_inputs_stride_early_and_small_inputs_keep_their_seed(family):
    f = search_spaces.get(family)
    spec = f.seed(IMAGENET, 1000)
    model = build(spec)
    assert count_macs(spec) == measure_macs(model) < 30e6
    features = {}
    last = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last.register_forward_hook(lambda m, i, o: features.__setitem__("hw", tuple(o.shape[2:])))
    model.eval()(torch.rand(1, *IMAGENET))
    assert features["hw"] == (7, 7)  # ImageNet networks' last resolution
    stem = "stem_stride" if family == "mobilenet" else "stem"  # mobilenet's "stem" is the stem's width
    assert spec.body[stem] == (2 if family == "mobilenet" else "strided")
    for shape in ((3, 32, 32), (3, 64, 64)):
        assert f.seed(shape, 10).body.get(stem, 1) in (1, 8)  # the plain stem of small inputs
    assert f.seed((3, 65, 65), 10).body[stem] == spec.body[stem]  # from 65 pixels on, the strided one


@pytest.mark.parametrize("family", ["vgg", "resnet"])
def test_growing_a_strided_seed_keeps_its_function_and_its_stem(family):
    torch.manual_seed(0)
    model = build(search_spaces.get(family).seed((3, 128, 128), 10)).eval()
    x = torch.rand(2, 3, 128, 128)
    name = grow.widenable(model)[0]
    wider = grow.widen(model, {name: 12}, init="split").eval()
    deeper = grow.deepen(wider, stage=0).eval()
    with torch.no_grad():
        assert torch.allclose(deeper(x), model(x), atol=1e-4)
    assert deeper.spec.body["stem"] == "strided"
    assert ArchSpec.from_json(deeper.spec.to_json()) == deeper.spec
    assert count_macs(deeper.spec) == measure_macs(deeper)
