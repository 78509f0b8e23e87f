"""Datasets: the real on-disk layouts, clear errors when data is missing, honest splits, fast batches."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from grow.data import DEBIAN_FASHION_MNIST, Batches, DataError, load_dataset


def write_cifar(root: Path, n_per_batch: int = 20, hundred: bool = False) -> None:
    """A small archive in the python-version layout: pickled dicts whose keys read back as str
    (the official files were pickled by Python 2; torchvision loads them with latin-1)."""
    rng = np.random.default_rng(0)
    if hundred:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True)
        for name, n in (("train", 5 * n_per_batch), ("test", n_per_batch)):
            data = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                    "fine_labels": list(rng.integers(0, 100, n)), "coarse_labels": list(rng.integers(0, 20, n))}
            (folder / name).write_bytes(pickle.dumps(data))
        meta = {"fine_label_names": [f"c{k}" for k in range(100)], "coarse_label_names": [f"s{k}" for k in range(20)]}
        (folder / "meta").write_bytes(pickle.dumps(meta))
        return
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = {"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                "labels": list(rng.integers(0, 10, n_per_batch))}
        (folder / name).write_bytes(pickle.dumps(data))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names}))


def test_cifar10_layout_is_read(tmp_path):
    write_cifar(tmp_path)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "data_batch_1").read_bytes())
    splits = load_dataset("cifar10", str(tmp_path), val_fraction=0.2, download=False)
    assert splits.info.input_shape == (3, 32, 32) and splits.info.num_classes == 10
    assert splits.info.classes[0] == "airplane"
    assert len(splits.train) + len(splits.val) == 100 and len(splits.test) == 20
    assert splits.train.images.dtype == torch.uint8
    # the first training image, in CHW, is the first row of data_batch_1
    everything = torch.cat([splits.train.images, splits.val.images])
    first = torch.from_numpy(raw["data"][0].reshape(3, 32, 32))
    assert any(torch.equal(first, img) for img in everything)


@pytest.mark.parametrize("side", [48, 16])
def test_image_size_resizes_a_fixed_size_set_as_imagefolder_would(tmp_path, side):
    """cifar10 at --image-size 48 (or 16): every picture is PIL's bilinear resize of the archive's, the one
    imagefolder applies to pictures on disk, and the crops' padding keeps its share of the side."""
    from PIL import Image

    write_cifar(tmp_path)
    raw = pickle.loads((tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes())["data"]
    splits = load_dataset("cifar10", str(tmp_path), download=False, image_size=side)
    assert splits.info.input_shape == (3, side, side) and splits.info.crop_pad == side // 8
    assert splits.train.images.shape[1:] == (3, side, side) and splits.train.images.dtype == torch.uint8
    for k in (0, 7):
        picture = Image.fromarray(raw[k].reshape(3, 32, 32).transpose(1, 2, 0)).resize((side, side), Image.BILINEAR)
        assert torch.equal(splits.test.images[k], torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1))


def test_cifar100_layout_is_read(tmp_path):
    write_cifar(tmp_path, hundred=True)
    splits = load_dataset("cifar100", str(tmp_path), download=False)
    assert splits.info.num_classes == 100 and len(splits.test) == 20


def test_unreadable_archive_says_so(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="could not be read"):
        load_dataset("cifar10", str(tmp_path), download=False)


def test_missing_data_names_the_place(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nothing")):
        load_dataset("cifar10", str(tmp_path / "nothing"), download=False)


def test_unknown_dataset():
    with pytest.raises(DataError, match="cifar10"):
        load_dataset("imagenet-9000")


def write_folder(root: Path, classes=("cat", "dog"), n=6, size=(12, 10)):
    from PIL import Image
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


def test_imagefolder_with_train_and_val(tmp_path):
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "val", n=3)
    splits = load_dataset("imagefolder", str(tmp_path), val_fraction=0.25, download=False)
    assert splits.info.classes == ["cat", "dog"] and splits.info.input_shape == (3, 12, 10)
    assert len(splits.test) == 6 and len(splits.train) + len(splits.val) == 12


def test_imagefolder_single_folder_is_split(tmp_path):
    write_folder(tmp_path, n=10)
    splits = load_dataset("imagefolder", str(tmp_path), val_fraction=0.25, download=False)
    assert len(splits.test) == 4 and len(splits.train) + len(splits.val) == 16


def test_splits_are_disjoint_and_fixed_by_the_seed():
    a = load_dataset("synthetic", seed=3)
    b = load_dataset("synthetic", seed=3)
    assert torch.equal(a.val.images, b.val.images)
    assert len(a.val) == round(0.1 * (len(a.train) + len(a.val)))
    train_keys = {hash(x.numpy().tobytes()) for x in a.train.images[:2000]}
    assert not any(hash(x.numpy().tobytes()) in train_keys for x in a.val.images)
    c = load_dataset("synthetic", seed=4)
    assert not torch.equal(a.val.labels, c.val.labels)


def test_train_subset():
    splits = load_dataset("synthetic", train_subset=500)
    assert len(splits.train) == 500


def test_synthetic_is_learnable_but_not_trivial():
    splits = load_dataset("synthetic")
    x = splits.train.images.float().flatten(1) / 255
    y = splits.train.labels
    assert torch.bincount(y).min() > len(y) / 20
    # class means differ (there is signal) but are not separable by mean brightness alone
    brightness = x.mean(1)
    per_class = torch.stack([brightness[y == k].mean() for k in range(10)])
    assert per_class.std() < 0.02


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist to run this")
def test_fashion_mnist_from_debian_package():
    splits = load_dataset("fashion-mnist", download=False)
    assert splits.info.input_shape == (1, 28, 28)
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.test) == 10000
    assert splits.info.classes[9] == "Ankle boot" and splits.info.flip


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.exists(), reason="apt-get install dataset-fashion-mnist to run this")
def test_fashion_mnist_at_another_size_stays_grey():
    splits = load_dataset("fashion-mnist", download=False, image_size=(14, 20))
    assert splits.info.input_shape == (1, 14, 20) and splits.test.images.shape == (10000, 1, 14, 20)
    assert splits.info.crop_pad == 1


def small_set():
    splits = load_dataset("synthetic", train_subset=300)
    return splits


def test_batches_cover_every_sample_once_per_epoch():
    splits = small_set()
    batches = Batches(splits.train, 64, info=splits.info, train=True, seed=0, augment=False, drop_last=False)
    labels = torch.cat([y for _, y in batches])
    assert sorted(labels.tolist()) == sorted(splits.train.labels.tolist())
    x, _ = next(iter(batches))
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1


def test_augmentation_is_deterministic_per_epoch_and_varies_across_epochs():
    splits = small_set()
    batches = Batches(splits.train, 64, info=splits.info, train=True, seed=5)
    batches.set_epoch(2)
    first = next(iter(batches))[0]
    again = next(iter(batches))[0]
    batches.set_epoch(3)
    other = next(iter(batches))[0]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_crop_shifts_content_and_flip_only_when_allowed():
    splits = small_set()
    info = splits.info
    assert not info.flip and info.crop_pad == 2
    one = splits.train.subset(torch.zeros(64, dtype=torch.long))  # the same image 64 times
    x, _ = next(iter(Batches(one, 64, info=info, train=True, seed=0)))
    assert x.shape[1:] == one.images.shape[1:]
    assert len({t.numpy().tobytes() for t in x}) > 5, "random crops differ"
    flipped = torch.flip(one.images[0], dims=[2]).float() / 255
    assert not any(torch.equal(t, flipped) for t in x)
    from dataclasses import replace
    x, _ = next(iter(Batches(one, 64, info=replace(info, flip=True, crop_pad=0), train=True, seed=0)))
    assert any(torch.equal(t, flipped) for t in x) and any(torch.equal(t, one.images[0].float() / 255) for t in x)


def test_eval_batches_are_ordered_and_plain():
    splits = small_set()
    x, y = next(iter(Batches(splits.test, 32, info=splits.info, train=False)))
    assert torch.equal(y, splits.test.labels[:32])
    assert torch.equal(x, splits.test.images[:32].float() / 255)
