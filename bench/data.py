"""Images per second: our in-memory batched augmentation vs torchvision's DataLoader pipeline.

    python bench/data.py [--data-dir DIR_WITH_cifar-10-batches-py] [--images 10000]

Both produce the same training batches: random 32x32 crop with 4 pixels of zero padding, random
horizontal flip, float tensors in [0, 1], batch 128, shuffled. Without --data-dir a CIFAR-format
archive of random images is written to a temporary folder and read through torchvision's CIFAR10
reader, so the per-sample cost (PIL conversion, transforms, collation) is the real one.
"""
from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grow.data import Batches, load_dataset, torchvision_cifar  # noqa: E402


def write_archive(root: Path, images: int, test_images: int = 100) -> None:
    """CIFAR-10's python-version layout under `root`, of random pictures and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    per_batch = images // 5
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", test_images)]:
        data = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        (folder / name).write_bytes(pickle.dumps(data))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(k) for k in range(10)]}))


def rate(batches, epochs: int = 2) -> float:
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for x, y in batches:
            n += len(y)
    return n / (time.perf_counter() - start)


def torchvision_loader(root: Path, workers: int):
    from torchvision import transforms

    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor()])
    ds = torchvision_cifar("CIFAR10")(str(root), train=True, transform=tf, download=False)
    return torch.utils.data.DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        source = "real CIFAR-10" if args.data_dir else f"generated CIFAR-format archive, {args.images} images"
        if not args.data_dir:
            write_archive(root, args.images)
        splits = load_dataset("cifar10", str(root), val_fraction=0.0, download=False)
        ours = rate(Batches(splits.train, 128, info=splits.info, train=True, seed=0))
        rows = [("grow.data.Batches (in memory, batched crop+flip)", ours)]
        for workers in (0, 2):
            rows.append((f"torchvision DataLoader, num_workers={workers}", rate(torchvision_loader(root, workers))))
    print(f"data: {source}; batch 128, crop 32 pad 4 + flip, CPU, {torch.get_num_threads()} threads")
    print(f"{'pipeline':52s} {'images/s':>10s} {'ours is':>9s}")
    for name, r in rows:
        print(f"{name:52s} {r:10.0f} {ours / r:8.1f}x")


if __name__ == "__main__":
    main()
