"""Throughput of a growth round against plain PyTorch SGD training of the same network, on the GPU.

    python bench/gpu.py [--arch resnet20] [--precision auto] [--compile] [--images 50000] [--full-run]

Meant for a machine with a CUDA GPU (run it whenever one is lent and record the card's name). Both
sides train the same network on the same in-memory CIFAR-sized batches (3x32x32, batch 128), in the
same precision and layout (autocast, channels_last):

- growth round: what a round of `grow` runs (grow.train.train_epoch with DessiLBI: Gamma on every
  conv, the loss counters, the divergence checks);
- plain SGD: the loop a PyTorch user writes (forward, cross-entropy, backward, torch.optim.SGD with
  momentum, foreach), nothing else.

Each side trains --epochs epochs; the first is a warm-up (cuDNN autotuning, torch.compile) and the
figures are the mean of the others. --full-run also times a whole growth run (`grow_network`, the
default 26-epoch schedule, 40M MACs) on CIFAR-10 if --data-dir has it, else on the same number of
random CIFAR-sized images. On a CPU everything runs on a small set and says so: the figures then
describe the CPU, not the GPU path.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import search_spaces  # noqa: E402
from data import write_archive  # noqa: E402  (bench/data.py)
from grow.data import Batches, DatasetInfo, TensorSet  # noqa: E402
from grow.optim import DessiLBI  # noqa: E402
from grow.policy import lbi_param_groups  # noqa: E402
from grow.spec import build  # noqa: E402
from grow.train import Accelerated, autocast, grad_scaler, resolve_precision, train_epoch  # noqa: E402

INFO = DatasetInfo("random-cifar", (3, 32, 32), 10, (0.5,) * 3, (0.25,) * 3, True, 4, [str(k) for k in range(10)])


def random_set(n: int) -> TensorSet:
    g = torch.Generator().manual_seed(0)
    return TensorSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n,), generator=g))


def network(arch: str, device: torch.device) -> torch.nn.Module:
    family = next(f for f in search_spaces.names() if arch.startswith(f[:3]))
    torch.manual_seed(0)
    return build(search_spaces.get(family).classic(arch, INFO.input_shape, INFO.num_classes)).to(device)


def growth_round(args, batches, device, precision) -> list[float]:
    model = network(args.arch, device)
    optimizer = DessiLBI(lbi_param_groups(model), lr=0.1, kappa=1.0, mu=20.0, momentum=0.9, weight_decay=5e-4)
    net = Accelerated(compile=args.compile, precision=precision)(model, (args.batch_size, *INFO.input_shape))
    scaler = grad_scaler(precision, device)
    return [train_epoch(net, optimizer, batches, precision=precision, scaler=scaler).seconds
            for _ in range(args.epochs)]


def plain_sgd(args, batches, device, precision) -> list[float]:
    model = network(args.arch, device).to(memory_format=torch.channels_last)
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    scaler = grad_scaler(precision, device)
    times = []
    for _ in range(args.epochs):
        sync(device)
        start = time.perf_counter()
        net.train()
        for x, y in batches:
            with autocast(device, precision):
                loss = F.cross_entropy(net(x.contiguous(memory_format=torch.channels_last)), y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_cifar_folder(n_train: int, n_test: int = 10_000) -> str:
    """A folder holding cifar-10-batches-py of random pictures and labels (bench/data.py's archive), so
    a full run reads CIFAR-10's sizes through the same reader (its accuracy means nothing)."""
    root = Path(tempfile.mkdtemp(prefix="grow-random-cifar-"))
    write_archive(root, n_train, n_test)
    return str(root)


def full_run(args, device) -> float:
    from grow.controller import GrowConfig, grow_network
    found = args.data_dir and (Path(args.data_dir) / "cifar-10-batches-py").is_dir()
    data_dir = args.data_dir if found else random_cifar_folder(args.images or 50_000)
    config = GrowConfig(dataset="cifar10", data_dir=data_dir, budget_macs=40_000_000,
                        precision=args.precision, compile=args.compile, device=str(device), download=False,
                        out=tempfile.mkdtemp(prefix="grow-bench-"))
    start = time.perf_counter()
    result = grow_network(config)
    seconds = time.perf_counter() - start
    what = "CIFAR-10" if found else "random CIFAR-sized pictures (accuracy means nothing)"
    pictures = result.history["dataset"]["train"] + result.history["dataset"]["val"]
    print(f"full growth run on {what}, {pictures:,} training pictures ({len(result.history['rounds'])} rounds, "
          f"{result.history['final']['macs'] / 1e6:.1f}M MACs, test accuracy {result.test_accuracy:.4f}): "
          f"{seconds:.0f} s wall in {config.out}")
    rounds = sum(r["seconds"] for r in result.history["rounds"])
    print(f"  growth rounds {rounds:.0f} s, the rest (fine-tune, evaluation, checkpoints) {seconds - rounds:.0f} s")
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet20", help="a classic member: resnet20/32/56, vgg11/16, mobilenetv2")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--compile", action="store_true")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--images", type=int, default=None, help="default: 50000 on a GPU, 1024 on a CPU")
    p.add_argument("--epochs", type=int, default=3, help="per side; the first is a warm-up")
    p.add_argument("--full-run", action="store_true", help="also time a whole growth run")
    p.add_argument("--data-dir", default=None, help="where cifar-10-batches-py is, for --full-run")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU, {torch.get_num_threads()} threads"
        print("note: no CUDA GPU here; these figures describe the CPU path, not the GPU fast path")
    precision = resolve_precision(args.precision, device)
    images = args.images or (50_000 if device.type == "cuda" else 1024)
    batches = Batches(random_set(images), args.batch_size, info=INFO, train=True, device=device, augment=True)
    print(f"{args.arch} on {card}, {images} images 3x32x32, batch {args.batch_size}, "
          f"precision {precision or torch.float32}, channels_last, compile {args.compile}")
    rows = [("growth round (DessiLBI)", growth_round(args, batches, device, precision)),
            ("plain SGD", plain_sgd(args, batches, device, precision))]
    seen = len(batches) * args.batch_size
    steady = {name: sum(times[1:] or times) / len(times[1:] or times) for name, times in rows}
    for name, times in rows:
        epoch = steady[name]
        print(f"  {name:24s} epoch {epoch:8.2f} s  {seen / epoch:10.0f} img/s  {epoch / steady['plain SGD']:5.2f}x "
              f"plain SGD's epoch  (warm-up epoch {times[0]:.2f} s)")
    if args.full_run:
        full_run(args, device)


if __name__ == "__main__":
    main()
