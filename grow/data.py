"""Datasets as in-memory uint8 tensors, split into train / validation / test, and fast batches.

The whole set lives in memory (on the training device for batching); augmentation (random crop
with padding, horizontal flip where the dataset allows it) is done on whole batches with tensor
ops, which is what makes small-image training fast on CPUs and GPUs alike. The model normalises
its input itself, so batches are float images in [0, 1].
"""
from __future__ import annotations

import gzip
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from grow import distributed


class DataError(Exception):
    """Data that cannot be read: the message says which dataset, where we looked, and what to do."""


@dataclass
class TensorSet:
    images: torch.Tensor  # uint8 [N, C, H, W]
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "TensorSet":
        return TensorSet(self.images[index], self.labels[index])


@dataclass
class DatasetInfo:
    name: str
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    flip: bool
    crop_pad: int
    classes: list[str]
    storage: str = "memory"  # or "stream": pictures decoded from disk every epoch (grow.stream)
    storage_note: str = ""  # for folder datasets: why they are held in memory or streamed


@dataclass
class Splits:
    train: TensorSet
    val: TensorSet
    test: TensorSet
    info: DatasetInfo

    def labelled(self) -> int:
        """Pictures with a label a network may train on (train + validation; what the weight decay follows)."""
        return len(self.train) + len(self.val)


DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "fashion-mnist", "mnist", "svhn", "synthetic", "imagefolder",
                             "imagenet")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def default_data_dir() -> Path:
    return Path(os.environ.get("GROW_DATA", Path.home() / ".cache" / "grow" / "data"))


def load_dataset(name: str, data_dir: Optional[str] = None, *, val_fraction: float = 0.1, seed: int = 0,
                 train_subset: Optional[int] = None, download: bool = True,
                 image_size: Optional[int | tuple[int, int]] = None, stream: str = "auto",
                 stream_above: Optional[int] = None, workers: Optional[int] = None) -> Splits:
    """Read `name` into memory and split it: validation is carved from the training set by `seed`.

    `image_size` (an int or (height, width)) sets the size of the pictures: imagefolder and imagenet
    pictures are read at it (imagenet: 224), the other datasets' pictures resized to it (bilinear, as
    imagefolder resizes), for a network that must take another resolution than the set's own; the
    random crops' padding scales with the side. Folder datasets too large for memory are
    streamed instead (grow.stream.plan: `stream` "auto", "on" or "off", `stream_above` bytes,
    `workers` DataLoader processes): their splits are then FileSets, which Batches streams.
    """
    from grow import stream as streaming

    readers = {"synthetic": _synthetic, "fashion-mnist": _fashion_mnist, "mnist": _mnist, "cifar10": _cifar10,
               "cifar100": _cifar100, "svhn": _svhn,
               "imagefolder": lambda root, download, seed: _imagefolder(root, seed, _as_size(image_size)),
               "imagenet": lambda root, download, seed: streaming.decoded_sets(plan)}  # plan: below
    if name not in readers:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}")
    if train_subset is not None and train_subset < 1:
        raise DataError(f"--train-subset must be at least 1, got {train_subset}")
    folder = name in streaming.FOLDER_DATASETS
    if stream not in streaming.STREAM_MODES:
        raise DataError(f"stream must be one of {', '.join(streaming.STREAM_MODES)}, got {stream!r}")
    if stream == "on" and not folder:
        raise DataError(f"streaming applies to imagefolder and imagenet; {name} is small enough for memory")
    root = Path(data_dir).expanduser() if data_dir else None
    size = _as_size(image_size)
    plan = streaming.plan(name, root, seed, size, stream=stream, stream_above=stream_above,
                          workers=workers) if folder else None
    if plan and plan.streamed:
        train, test, meta = streaming.streamed_sets(plan)
    else:
        train, test, meta = readers[name](root, download, seed)
    if size is not None and not folder:
        meta = _padded_for(train, size, meta)
        train, test = _resized(train, size), _resized(test, size)
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    n_val = int(round(len(train) * val_fraction))
    if n_val >= len(train):
        raise DataError(f"{name}: a validation fraction of {val_fraction} leaves no training images "
                        f"out of {len(train)}")
    val, train = train.subset(perm[:n_val]), train.subset(perm[n_val:])
    if train_subset is not None:
        train = train.subset(torch.arange(min(train_subset, len(train))))
    if plan and plan.streamed:
        (mean, std), shape = streaming.sample_stats(train, seed), (3, *plan.size)
    else:
        (mean, std), shape = channel_stats(train.images), tuple(train.images.shape[1:])
    info = DatasetInfo(name, shape, meta["num_classes"], mean, std, meta["flip"], meta["crop_pad"], meta["classes"],
                       "stream" if plan and plan.streamed else "memory", plan.note() if plan else "")
    return Splits(train, val, test, info)


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], in chunks: a float copy of all of
    CIFAR's training set would take 600 MB just to compute six numbers."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].to(torch.float64).transpose(0, 1).flatten(1)
        total += x.sum(1)
        squares += x.square().sum(1)
    count = images.numel() // images.shape[1]
    mean = total / count
    var = (squares / count - mean.square()) * count / max(count - 1, 1)
    std = var.clamp_min(0).sqrt().div(255).clamp_min(1e-3)
    return tuple((mean / 255).tolist()), tuple(std.tolist())


def _resized(images: TensorSet, size: tuple[int, int], chunk: int = 4096) -> TensorSet:
    """`images` at `size` (height, width): antialiased bilinear on uint8, which gives PIL's bilinear
    resize (imagefolder's) to the bit, in chunks so that no float copy of the set is ever made."""
    if tuple(images.images.shape[2:]) == size:
        return images
    out = torch.empty((len(images), images.images.shape[1], *size), dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        out[start:start + chunk] = nn.functional.interpolate(images.images[start:start + chunk], size=size,
                                                             mode="bilinear", antialias=True, align_corners=False)
    return TensorSet(out, images.labels)


def _padded_for(images: TensorSet, size: tuple[int, int], meta: dict) -> dict:
    """`meta` with the random crops' padding scaled from the set's own width to `size`'s (4 of 32 -> 12 of 96)."""
    own = images.images.shape[3]
    return {**meta, "crop_pad": max(1, round(meta["crop_pad"] * size[1] / own))}


def _as_size(size: Optional[int | tuple[int, int]]) -> Optional[tuple[int, int]]:
    if size is None:
        return None
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise DataError(f"the image size must be positive, got {size}")
    return int(height), int(width)


# --- readers -------------------------------------------------------------------------------
def _synthetic(root, download, seed, n_train: int = 20000, n_test: int = 2000, size: int = 16, classes: int = 10):
    """Oriented colour gratings: class = orientation (5) x frequency (2), random phase, colour and
    contrast, plus pixel noise. A CNN learns it in an epoch or two, not instantly. Smoke tests only."""
    def make(n, gen_seed):
        g = torch.Generator().manual_seed(gen_seed)
        labels = torch.randint(0, classes, (n,), generator=g)
        theta = (labels % 5).float() * math.pi / 5 + 0.15 * torch.randn(n, generator=g)
        freq = torch.where(labels < 5, 1.5, 3.0) * (1 + 0.1 * torch.randn(n, generator=g))
        phase = 2 * math.pi * torch.rand(n, generator=g)
        ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        proj = torch.cos(theta)[:, None, None] * xs + torch.sin(theta)[:, None, None] * ys
        wave = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
        colour = 0.3 + 0.7 * torch.rand(n, 3, 1, 1, generator=g)
        img = 0.5 + 0.35 * colour * wave[:, None] + 0.25 * torch.randn(n, 3, size, size, generator=g)
        return TensorSet((img.clamp(0, 1) * 255).round().to(torch.uint8), labels)

    meta = {"num_classes": classes, "flip": False, "crop_pad": 2, "classes": [f"class{k}" for k in range(classes)]}
    return make(n_train, 1_000_003 + seed), make(n_test, 2_000_003 + seed), meta


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (the MNIST format: zero, zero, type 0x08 = uint8, number of dimensions, big-endian sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if raw[:3] != b"\x00\x00\x08":
            raise ValueError("not a uint8 idx file")
        ndim = raw[3]
        dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (OSError, ValueError, EOFError, IndexError) as err:
        raise DataError(f"{path} could not be read ({err}); replace it with the original idx file") from None


def _idx_pair(folder: Path, prefix: str) -> Optional[TensorSet]:
    for suffix in (".gz", ""):
        images, labels = folder / f"{prefix}-images-idx3-ubyte{suffix}", folder / f"{prefix}-labels-idx1-ubyte{suffix}"
        if images.exists() and labels.exists():
            x = torch.from_numpy(_read_idx(images).copy()).unsqueeze(1)
            return TensorSet(x, torch.from_numpy(_read_idx(labels).astype(np.int64)))
    return None


def _mnist_like(root, download, torchvision_cls, folder_name, label, extra_dirs, classes, flip):
    """The four idx files (.gz or not) in a given folder, in torchvision's root/<Name>/raw, or (with no
    folder given) in `extra_dirs`; else torchvision's download. A folder holding the idx files directly
    counts only when the user named it: MNIST and Fashion-MNIST files share their names."""
    meta = {"num_classes": 10, "flip": flip, "crop_pad": 2, "classes": classes}
    base = root or default_data_dir()
    folders = [root] if root else list(extra_dirs)
    folders.append(base / folder_name / "raw")
    for folder in folders:
        train, test = _idx_pair(folder, "train"), _idx_pair(folder, "t10k")
        if train and test:
            return train, test, meta
    try:
        import torchvision
        sets = [getattr(torchvision.datasets, torchvision_cls)(str(base), train=t, download=download) for t in (True, False)]
    except Exception as err:
        hint = " (or: apt-get install dataset-fashion-mnist)" if folder_name == "FashionMNIST" else ""
        searched = " or ".join(str(f) for f in folders)
        raise DataError(f"{label} not found (looked for the four idx files in {searched})"
                        f"{'' if download else ' and downloading is off'}; download it with network access{hint}"
                        f" [{type(err).__name__}]") from None
    return (*(TensorSet(s.data.unsqueeze(1).clone(), s.targets.clone().long()) for s in sets), meta)


def _fashion_mnist(root, download, seed):
    return _mnist_like(root, download, "FashionMNIST", "FashionMNIST", "Fashion-MNIST", [DEBIAN_FASHION_MNIST],
                       FASHION_CLASSES, flip=True)


def _mnist(root, download, seed):
    return _mnist_like(root, download, "MNIST", "MNIST", "MNIST", [], [str(k) for k in range(10)], flip=False)


def torchvision_cifar(cls_name: str) -> type:
    """torchvision's CIFAR10/CIFAR100 reader without the md5 sums of the official batch files, so a
    user's re-packed copy or the small archive our tests write reads too (a download still checks
    the archive's md5)."""
    import torchvision

    parent = getattr(torchvision.datasets, cls_name)
    return type(f"Unchecked{cls_name}", (parent,), {
        "train_list": [[name, None] for name, _ in parent.train_list],
        "test_list": [[name, None] for name, _ in parent.test_list],
        "meta": {**parent.meta, "md5": None},
    })


def _cifar(root, download, cls_name, folder, label, num_classes):
    base = root or default_data_dir()
    Reader = torchvision_cifar(cls_name)
    try:
        train, test = (Reader(str(base), train=t, download=download) for t in (True, False))
    except Exception as err:
        if (base / folder).is_dir() and any((base / folder).iterdir()):
            raise DataError(f"{label} in {base / folder} could not be read ({type(err).__name__}: {err}); "
                            "replace it with the python-version archive") from None
        raise DataError(f"{label} not found in {base} (expected {base / folder}); run with network access to "
                        f"download it there, or copy the python-version archive's folder there [{type(err).__name__}]"
                        ) from None

    def tensors(ds):
        return TensorSet(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets))

    meta = {"num_classes": num_classes, "flip": True, "crop_pad": 4, "classes": list(train.classes)}
    return tensors(train), tensors(test), meta


def _cifar10(root, download, seed):
    return _cifar(root, download, "CIFAR10", "cifar-10-batches-py", "CIFAR-10", 10)


def _cifar100(root, download, seed):
    return _cifar(root, download, "CIFAR100", "cifar-100-python", "CIFAR-100", 100)


def _svhn(root, download, seed):
    import torchvision

    base = root or default_data_dir()
    files = [base / f"{split}_32x32.mat" for split in ("train", "test")]
    if all(f.exists() for f in files) or download:
        try:
            import scipy.io  # noqa: F401  (torchvision reads the .mat files with it)
        except ImportError:
            raise DataError("SVHN's .mat files need scipy to be read: pip install scipy") from None
    try:
        sets = [torchvision.datasets.SVHN(str(base), split=s, download=download) for s in ("train", "test")]
    except Exception as err:
        raise DataError(f"SVHN not found or corrupt in {base} (expected {files[0].name} and {files[1].name}); run "
                        f"with network access to download it there [{type(err).__name__}]") from None
    meta = {"num_classes": 10, "flip": False, "crop_pad": 4, "classes": [str(k) for k in range(10)]}
    return (*(TensorSet(torch.from_numpy(s.data).clone(), torch.from_numpy(s.labels).long()) for s in sets), meta)


def _imagefolder(root: Optional[Path], seed: int, size: Optional[tuple[int, int]],
                 test_fraction: float = 0.2):
    """ImageFolder layout: root/train + root/val (or root/test), or one folder of class subfolders of
    which a seeded `test_fraction` becomes the test split. RGB, all resized to `size`, by default the
    training images' own size when they all agree, else 32x32."""
    import torchvision

    if root is None or not root.is_dir():
        raise DataError(f"imagefolder needs --data-dir pointing at a folder of class subfolders, got {root}")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    split = train_dir.is_dir() and test_dir is not None
    try:
        train_ds = torchvision.datasets.ImageFolder(str(train_dir if split else root))
        test_ds = torchvision.datasets.ImageFolder(str(test_dir)) if split else None
        train_images = _read_images(train_ds)
        test_images = _read_images(test_ds) if split else []
    except (FileNotFoundError, OSError) as err:
        raise DataError(f"cannot read images from {root}: {err}") from None
    if test_ds is not None and train_ds.classes != test_ds.classes:
        raise DataError(f"{train_dir} and {test_dir} have different class folders")
    sizes = {img.shape[:2] for img in train_images}
    size = size or (next(iter(sizes)) if len(sizes) == 1 else (32, 32))
    train = TensorSet(_stack(train_images, size), torch.tensor(train_ds.targets, dtype=torch.int64))
    if split:
        test = TensorSet(_stack(test_images, size), torch.tensor(test_ds.targets, dtype=torch.int64))
    else:
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, int(round(len(train) * test_fraction)))
        test, train = train.subset(perm[:n_test]), train.subset(perm[n_test:])
    meta = {"num_classes": len(train_ds.classes), "flip": True, "crop_pad": max(1, size[1] // 8),
            "classes": list(train_ds.classes)}
    return train, test, meta


def _read_images(ds) -> list[np.ndarray]:
    """Every image of an ImageFolder as an RGB uint8 array [H, W, 3], read once."""
    from PIL import Image

    images = []
    for path, _ in ds.samples:
        with Image.open(path) as im:
            images.append(np.asarray(im.convert("RGB")))
    return images


def _stack(images: list[np.ndarray], size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    def fit(img: np.ndarray) -> np.ndarray:
        if img.shape[:2] == size:
            return img
        return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BILINEAR))

    return torch.from_numpy(np.stack([fit(img) for img in images])).permute(0, 3, 1, 2).contiguous()


# --- batches -------------------------------------------------------------------------------
def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank `rank`'s contiguous share of a global batch of `n` (equal shares when n divides)."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def batch_ranks(batch_size: int, train: bool, rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    """(rank, world size) a batch iterator takes its slice by: training batches default to the torchrun
    job's, evaluation batches are never sharded. Refuses a batch size below 1."""
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")
    job = distributed.current() if train else distributed.SINGLE
    return (job.rank if rank is None else rank), (job.world_size if world_size is None else world_size)


class Batches:
    """Iterates over a TensorSet in batches on `device`: yields (x float32 NCHW in [0, 1], y int64).

    Given a FileSet (pictures on disk, see grow.stream) instead, the constructor returns a
    grow.stream.StreamBatches, which has this interface and decodes the pictures in DataLoader
    workers: every caller batches both kinds of data alike.

    Training batches are shuffled and augmented (random crop with reflect padding, horizontal flip
    where `info.flip`), deterministically for a given seed and epoch (`set_epoch`).

    Sharded (`world_size` > 1; for training batches by default the torchrun job's, see
    grow.distributed), `batch_size` is the global batch: every rank draws the same order and the
    same augmentation for the whole global batch and keeps its own contiguous slice of it, so N
    processes see together exactly the batches one process sees. `len()` counts global batches.
    """

    def __new__(cls, data, *args, **kwargs):
        if not isinstance(data, TensorSet):
            from grow.stream import FileSet, StreamBatches
            if isinstance(data, FileSet):
                return StreamBatches(data, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, data: TensorSet, batch_size: int, *, info: DatasetInfo, train: bool,
                 device: str | torch.device = "cpu", seed: int = 0, augment: bool = True,
                 drop_last: Optional[bool] = None, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.rank, self.world_size = batch_ranks(batch_size, train, rank, world_size)
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        self.batch_size = batch_size
        self.info = info
        self.train = train
        self.augment = augment and train
        self.drop_last = train and len(data) >= batch_size if drop_last is None else drop_last
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.labels), self.images.device
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, generator=gen).to(device) if self.train else torch.arange(n, device=device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            mine = shard(len(idx), self.rank, self.world_size)
            x = self.images[idx[mine]]
            if self.augment:
                x = self._augment(x, gen, len(idx), mine)
            yield x.float().div_(255), self.labels[idx[mine]]

    def _augment(self, x: torch.Tensor, gen: torch.Generator, n: int, mine: slice) -> torch.Tensor:
        """Random numbers for all `n` images of the global batch; this rank's rows `mine` of them."""
        b, c, h, w = x.shape
        pad = self.info.crop_pad
        if pad:
            padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
            dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen)[mine].to(x.device)
            dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=gen)[mine].to(x.device)
            rows = (dy + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * pad)
            x = padded.gather(2, rows)
            cols = (dx + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
            x = x.gather(3, cols)
        if self.info.flip:
            flip = (torch.rand(n, generator=gen) < 0.5)[mine].to(x.device).view(b, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        return x


class FirstBatches:
    """The first `steps` batches of every pass over `batches` (a Batches or StreamBatches): a short
    epoch that still draws each pass's own shuffled order and augmentation (`set_epoch`)."""

    def __init__(self, batches, steps: int):
        self.batches, self.steps = batches, steps

    def __getattr__(self, name: str):
        return getattr(self.batches, name)

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return min(self.steps, len(self.batches))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.islice(iter(self.batches), len(self))
