"""Picture folders too large for memory: listed up front, decoded by DataLoader workers every epoch.

grow.data holds a dataset as one uint8 tensor and augments whole batches, which is what makes small
images fast. ImageNet does not fit that way (1.28M pictures are 193 GB decoded at 224x224), so a
folder dataset (`imagefolder`, `imagenet`) whose decoded size passes a threshold (a quarter of the
available memory, or $GROW_STREAM_ABOVE), or any folder with `stream="on"`, is kept as a list of
files, a `FileSet`, and batched by `StreamBatches`: torch DataLoader workers decode each picture
and apply the usual ImageNet transforms (RandomResizedCrop + horizontal flip for training; Resize to
256/224 of the size + CenterCrop for evaluation).

StreamBatches presents Batches' interface, so grow.train and the controller do not know which one
they iterate (`grow.data.Batches(file_set, ...)` returns a StreamBatches): float32 NCHW images in
[0, 1] and int64 labels on the device, len() in global batches, set_epoch(), and under torchrun each
rank's contiguous slice of every global batch. Every picture's crop and flip come from a seed drawn
for its place in the global batch, so they do not depend on which rank or worker decodes it.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from grow import distributed
from grow.data import DataError, DatasetInfo, TensorSet, batch_ranks, channel_stats, shard

if TYPE_CHECKING:
    from grow.spec import ArchSpec

FOLDER_DATASETS = ("imagefolder", "imagenet")
STREAM_MODES = ("auto", "on", "off")
IMAGENET_SIZE = 224
EVAL_RESIZE = 256 / 224  # resize to 256, crop the central 224: the ImageNet evaluation convention
HEADER_SAMPLE = 32  # pictures whose headers are read to estimate the decoded size of a folder
STATS_SAMPLE = 256  # training pictures decoded for the model's normalisation (mean/std per channel)
TEST_FRACTION = 0.2  # a folder without train/ and val/ (or test/) gives this share to the test split


@dataclass
class FileSet:
    """Pictures on disk and their labels; every picture is cropped to `size` (height, width) when read.

    The paths are one numpy array of bytes, not a list of str: DataLoader workers are forked, and
    Python objects touched in a forked process are copied page by page (their reference counts
    change), which for ImageNet's 1.28M paths would copy them into every worker.
    """

    paths: np.ndarray  # bytes (dtype S)
    labels: torch.Tensor  # int64 [N]
    size: tuple[int, int]
    workers: int = 0  # DataLoader worker processes (0: decode in the training process)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "FileSet":
        return FileSet(self.paths[index.numpy()], self.labels[index], self.size, self.workers)

    def path(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    @staticmethod
    def concat(sets: "list[FileSet] | tuple[FileSet, ...]") -> "FileSet":
        first = sets[0]
        return FileSet(np.concatenate([s.paths for s in sets]), torch.cat([s.labels for s in sets]), first.size,
                       first.workers)


def file_set(samples: list[tuple[str, int]], size: tuple[int, int] = (IMAGENET_SIZE, IMAGENET_SIZE),
             workers: int = 0) -> FileSet:
    """A FileSet of torchvision-style (path, class index) samples."""
    paths = np.array([os.fsencode(p) for p, _ in samples], dtype=bytes)
    return FileSet(paths, torch.tensor([c for _, c in samples], dtype=torch.int64), size, workers)


def read_like_training(dataset: str, spec: "ArchSpec", storage: Optional[str]) -> dict:
    """grow.data.load_dataset arguments that read a dataset as a model's training run did: pictures at
    the size the model takes (a fixed-size set such as cifar10 resized only when the run asked for
    another size), a folder dataset decoded the same way (streamed pictures are resized and
    centre-cropped, in-memory ones resized whole), as model.json's metrics.storage says."""
    size = {"image_size": tuple(spec.input_shape[1:])}
    if dataset not in FOLDER_DATASETS:
        return size
    return {**size, "stream": {"stream": "on", "memory": "off"}.get(storage, "auto")}


def default_workers() -> int:
    """DataLoader workers per process: this process's cores shared by the processes of this node
    (torchrun's LOCAL_WORLD_SIZE), one left for the training loop itself, at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, per_process - 1))


# --- listing ------------------------------------------------------------------------------------
@dataclass
class Listing:
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    classes: list[str]


def list_folder(name: str, root: Optional[Path], seed: int) -> Listing:
    """The pictures of a folder dataset, without decoding any (torchvision's folder readers).

    imagefolder: root/train with root/test or root/val, or one folder of class folders of which a
    seeded fifth becomes the test split (as grow.data reads it into memory). imagenet: torchvision's
    ImageNet reader when its devkit is there (meta.bin or ILSVRC2012_devkit_t12.tar.gz: class names,
    and the archives unpacked on first use), else root/train and root/val of class (wnid) folders;
    ImageNet's val split is the test split.
    """
    if root is None or not root.is_dir():
        raise DataError(f"{name} needs --data-dir pointing at a folder of pictures, got {root}")
    try:
        return _imagenet(root) if name == "imagenet" else _imagefolder(root, seed)
    except (FileNotFoundError, RuntimeError, OSError) as err:
        raise DataError(f"cannot list the pictures of {name} in {root}: {err}") from None


def _imagefolder(root: Path, seed: int) -> Listing:
    from torchvision.datasets import ImageFolder

    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = ImageFolder(str(root / "train")), ImageFolder(str(test_dir))
        if train.classes != test.classes:
            raise DataError(f"{root / 'train'} and {test_dir} have different class folders")
        return Listing(train.samples, test.samples, list(train.classes))
    every = ImageFolder(str(root))
    perm = torch.randperm(len(every.samples), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, int(round(len(perm) * TEST_FRACTION)))
    return Listing([every.samples[i] for i in perm[n_test:]], [every.samples[i] for i in perm[:n_test]],
                   list(every.classes))


def _imagenet(root: Path) -> Listing:
    from torchvision.datasets import ImageFolder, ImageNet

    if (root / "meta.bin").exists() or (root / "ILSVRC2012_devkit_t12.tar.gz").exists():
        train, val = ImageNet(str(root), split="train"), ImageNet(str(root), split="val")
        return Listing(train.samples, val.samples, [names[0] for names in train.classes])
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise DataError(f"imagenet: {root / split} is missing; give --data-dir the folder holding train/ and "
                            "val/ (one folder per class each), or ILSVRC2012_devkit_t12.tar.gz with the archives")
    try:
        val = ImageFolder(str(root / "val"))
    except FileNotFoundError:
        raise DataError(f"imagenet: {root / 'val'} holds no class folders; put ILSVRC2012_devkit_t12.tar.gz in "
                        f"{root} so torchvision sorts the validation pictures into them") from None
    train = ImageFolder(str(root / "train"))
    if train.classes != val.classes:
        raise DataError(f"imagenet: {root / 'train'} and {root / 'val'} have different class folders")
    return Listing(train.samples, val.samples, list(train.classes))


# --- memory or stream -----------------------------------------------------------------------------
@dataclass
class Plan:
    """How a folder dataset will be read, and why."""

    name: str
    listing: Listing
    size: tuple[int, int]  # what every picture is cropped (streamed) or resized (in memory) to
    decoded: int  # bytes the in-memory reader would hold
    threshold: int
    streamed: bool
    forced: bool
    workers: int

    def note(self) -> str:
        n = len(self.listing.train) + len(self.listing.test)
        how = ("streamed from disk by DataLoader workers" if self.streamed else "held in memory")
        why = ("as asked" if self.forced else
               f"{'above' if self.streamed else 'within'} the threshold of {_bytes(self.threshold)}")
        return f"{n:,} pictures ({_bytes(self.decoded)} decoded) {how}, {why}"


def plan(name: str, root: Optional[Path], seed: int, image_size: Optional[tuple[int, int]], *,
         stream: str = "auto", stream_above: Optional[int] = None, workers: Optional[int] = None) -> Plan:
    """List a folder dataset and choose: in memory (grow.data.Batches) or streamed (StreamBatches).

    Streamed when `stream` is "on", or "auto" and the decoded pictures would take more than
    `stream_above` bytes (default: $GROW_STREAM_ABOVE, else a quarter of the available memory).
    The decoded size is counted at the larger of the pictures' own size (sampled from their
    headers; the in-memory reader decodes each whole before resizing) and the training size.
    Under torchrun rank 0's choice is every rank's (free memory differs between machines).
    """
    if stream not in STREAM_MODES:
        raise DataError(f"stream must be one of {', '.join(STREAM_MODES)}, got {stream!r}")
    listing = list_folder(name, root, seed)
    if not listing.train:
        raise DataError(f"{name}: no pictures found in {root}")
    own = _header_sizes(listing.train, seed)
    common = own[0] if own and all(s == own[0] for s in own) else None
    size = image_size or ((IMAGENET_SIZE, IMAGENET_SIZE) if name == "imagenet" else common)
    mean_area = sum(h * w for h, w in own) / max(len(own), 1)
    in_memory_area = (size or (32, 32))[0] * (size or (32, 32))[1]  # grow.data's imagefolder default
    decoded = int((len(listing.train) + len(listing.test)) * 3 * max(mean_area, in_memory_area))
    threshold = stream_above if stream_above is not None else memory_threshold()
    streamed = distributed.broadcast(stream == "on" or (stream == "auto" and decoded > threshold))
    size = size or ((IMAGENET_SIZE, IMAGENET_SIZE) if streamed else (32, 32))
    workers = default_workers() if workers is None else workers
    return Plan(name, listing, size, decoded, threshold, streamed, stream != "auto", workers)


def memory_threshold() -> int:
    """$GROW_STREAM_ABOVE (bytes; K/M/G suffixes), else a quarter of the memory available now."""
    from grow.cost import parse_count

    text = os.environ.get("GROW_STREAM_ABOVE")
    if text:
        try:
            return parse_count(text)
        except ValueError:
            raise DataError(f"GROW_STREAM_ABOVE must be a number of bytes such as 8G, got {text!r}") from None
    return available_memory() // 4


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux: MemAvailable), else physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _header_sizes(samples: list[tuple[str, int]], seed: int) -> list[tuple[int, int]]:
    """(height, width) of a seeded sample of pictures, from their headers (nothing decoded)."""
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    picks = torch.randperm(len(samples), generator=gen)[:HEADER_SAMPLE].tolist()
    sizes = []
    for i in picks:
        try:
            with Image.open(samples[i][0]) as im:
                sizes.append((im.height, im.width))
        except OSError as err:
            raise DataError(f"cannot read picture {samples[i][0]}: {err}") from None
    return sizes


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def streamed_sets(p: Plan) -> tuple[FileSet, FileSet, dict]:
    """The plan's train and test splits as FileSets, and grow.data's reader metadata."""
    meta = {"num_classes": len(p.listing.classes), "flip": True, "crop_pad": 0, "classes": p.listing.classes}
    return file_set(p.listing.train, p.size, p.workers), file_set(p.listing.test, p.size, p.workers), meta


def decoded_sets(p: Plan) -> tuple[TensorSet, TensorSet, dict]:
    """The plan's pictures decoded into memory with the evaluation transform (resize, centre crop)."""
    train, test, meta = streamed_sets(p)
    return _decode_all(train), _decode_all(test), {**meta, "crop_pad": max(1, p.size[1] // 8)}


def _decode_all(files: FileSet) -> TensorSet:
    images = [x for x, _ in StreamBatches(files, 256, info=None, train=False).uint8_batches()]
    return TensorSet(torch.cat(images), files.labels.clone())


def sample_stats(files: FileSet, seed: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std per channel of up to STATS_SAMPLE training pictures (seeded), as evaluated."""
    picks = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed))[:STATS_SAMPLE]
    sample = _decode_all(files.subset(picks.sort().values))
    return channel_stats(sample.images)


# --- batches --------------------------------------------------------------------------------------
def transform(size: tuple[int, int], augment: bool, flip: bool) -> Callable:
    """PIL picture -> uint8 CHW tensor of `size`: random-resized crop (+ flip) or resize + centre crop."""
    from torchvision.transforms import v2

    if augment:
        steps = [v2.RandomResizedCrop(size, antialias=True)] + ([v2.RandomHorizontalFlip()] if flip else [])
    else:
        steps = [v2.Resize(round(max(size) * EVAL_RESIZE), antialias=True), v2.CenterCrop(size)]
    return v2.Compose([*steps, v2.PILToTensor()])


class _Pictures(Dataset):
    """Decodes picture `index` of a FileSet with the transform's random numbers seeded by `seed`."""

    def __init__(self, files: FileSet, transform: Callable):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image

        index, seed = item
        path = self.files.path(index)
        try:
            with Image.open(path) as im:
                picture = im.convert("RGB")
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read picture {path}: {err}") from None
        with torch.random.fork_rng(devices=[]):  # leaves the caller's random stream alone
            torch.manual_seed(seed)
            return self.transform(picture), int(self.files.labels[index])


class _GlobalBatches:
    """Batch sampler: this rank's share of every global batch, as (index, augmentation seed) pairs.

    The order and the seeds are drawn for the whole global batch from (seed, epoch), exactly as
    grow.data.Batches draws them, so N ranks together see the batches one process sees.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int, rank: int,
                 world_size: int):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=gen) if self.shuffle else torch.arange(self.n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            seeds = torch.randint(0, 2**62, (len(idx),), generator=gen)
            mine = shard(len(idx), self.rank, self.world_size)
            yield list(zip(idx[mine].tolist(), seeds[mine].tolist()))


class StreamBatches:
    """Batches of a FileSet decoded by DataLoader workers; the interface of grow.data.Batches.

    Yields (x float32 NCHW in [0, 1], y int64) on `device`. Training batches are shuffled and, with
    `augment`, random-resized-cropped and flipped (where `info.flip`), deterministically for a
    seed and epoch (`set_epoch`); otherwise resized and centre-cropped. Sharded (`world_size` > 1,
    for training batches by default the torchrun job's), `batch_size` is the global batch and each
    rank decodes only its own slice of it; len() counts global batches.
    """

    def __init__(self, data: FileSet, batch_size: int, *, info: Optional[DatasetInfo], train: bool,
                 device: str | torch.device = "cpu", seed: int = 0, augment: bool = True,
                 drop_last: Optional[bool] = None, rank: Optional[int] = None, world_size: Optional[int] = None):
        self.rank, self.world_size = batch_ranks(batch_size, train, rank, world_size)
        self.data = data
        self.batch_size = batch_size
        self.info = info
        self.train = train
        self.augment = augment and train
        self.device = torch.device(device)
        drop_last = train and len(data) >= batch_size if drop_last is None else drop_last
        self.sampler = _GlobalBatches(len(data), batch_size, train, drop_last, seed, self.rank, self.world_size)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.uint8_batches():
            yield x.to(self.device, non_blocking=True).float().div_(255), y.to(self.device, non_blocking=True)

    def uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The batches as decoded: uint8 NCHW on the CPU (a quarter of the bytes to move)."""
        flip = bool(self.info.flip) if self.info is not None else False
        loader = DataLoader(_Pictures(self.data, transform(self.data.size, self.augment, flip)),
                            batch_sampler=self.sampler, num_workers=self.data.workers,
                            pin_memory=self.device.type == "cuda")
        try:
            yield from loader
        except DataError as err:  # from a worker: "Caught DataError in DataLoader worker ..." + its traceback
            raise DataError(_last_line(err)) from None


def _last_line(err: Exception) -> str:
    """The original message of an exception re-raised by a DataLoader worker (its last line)."""
    lines = str(err).strip().splitlines()
    if len(lines) == 1:
        return lines[0]
    return lines[-1].split(": ", 1)[-1]
