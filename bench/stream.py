"""Pictures per second of streamed batches (grow.stream) by DataLoader workers, and what memory would cost.

    python bench/stream.py [--data-dir IMAGEFOLDER] [--pictures 512] [--size 224] [--workers 0,1,2]

Without --data-dir, writes `--pictures` JPEGs of ImageNet's typical 500x375 (quality 90, two classes)
to a temporary folder. Times one training epoch (RandomResizedCrop + flip, batch 64) and one
evaluation pass (Resize + CenterCrop) per worker count, after a first epoch that warms the page
cache, and prints the decoded size the memory threshold weighs. No network is trained: this is
the input pipeline alone, the ceiling a growth run on streamed data cannot pass.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grow.data import Batches, load_dataset  # noqa: E402
from grow.stream import FileSet  # noqa: E402


def write_pictures(root: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        # smooth colour fields plus noise: compresses like a photo, unlike pure noise
        base = rng.integers(0, 256, (8, 11, 3), dtype=np.uint8)
        picture = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
        noisy = np.asarray(picture).astype(np.int16) + rng.integers(-12, 12, (375, 500, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.jpg", quality=90)


def rate(batches) -> float:
    n, start = 0, time.perf_counter()
    for _, y in batches:
        n += len(y)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--pictures", type=int, default=512)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.data_dir) if args.data_dir else Path(tmp)
        if not args.data_dir:
            write_pictures(root, args.pictures)
        start = time.perf_counter()
        splits = load_dataset("imagefolder", str(root), stream="on", image_size=args.size, val_fraction=0, workers=0)
        print(f"{len(splits.train) + len(splits.test)} pictures, listed and normalisation sampled in "
              f"{time.perf_counter() - start:.1f} s; {splits.info.storage_note}")
        print(f"threads {os.environ.get('OMP_NUM_THREADS', 'default')}, cores {os.cpu_count()}, "
              f"load average {os.getloadavg()[0]:.1f}")
        print("workers | train pictures/s (crop+flip) | eval pictures/s (resize+crop)")
        for workers in (int(w) for w in args.workers.split(",")):
            files = FileSet(splits.train.paths, splits.train.labels, splits.train.size, workers)
            train = Batches(files, 64, info=splits.info, train=True)
            evaluation = Batches(files, 64, info=splits.info, train=False)
            rate(train)  # warm the page cache and the imports
            print(f"{workers:7d} | {rate(train):28.0f} | {rate(evaluation):29.0f}")


if __name__ == "__main__":
    main()
