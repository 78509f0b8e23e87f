"""Optimizer step time: DessiLBI vs torch SGD vs a seed-style per-parameter loop.

    python bench/optimizer.py [--steps 200] [--threads 1] [--models cnn,vgg-seed,vgg11] [--train-batch 128] [--train-model vgg-seed]

Same model, same fixed gradients, one CPU thread by default, for each of: the issue's 0.3M-parameter
CNN, grow's VGG seed (the first network a growth run trains) and VGG-11 (9M parameters, where
memory traffic is everything). DessiLBI runs twice: with its fused CPU kernel (the default on CPU)
and with the foreach path it takes on CUDA. The "seed-style" baseline is the same equations
written the way the paper's published toolbox did it: a Python loop over parameters, a copy of
each weight every step, the prox per parameter.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grow.optim import DessiLBI  # noqa: E402


def cnn() -> nn.Module:
    layers, c = [], 3
    for w in (32, 64, 64, 128, 128):
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


class SeedStyleLBI:
    """The equations in a per-parameter loop that copies each weight every step."""

    def __init__(self, params, lr, kappa=1.0, mu=100.0, momentum=0.9):
        self.params = list(params)
        self.lr, self.kappa, self.mu, self.momentum = lr, kappa, mu, momentum
        self.state = {p: {} for p in self.params}

    @torch.no_grad()
    def step(self):
        for p in self.params:
            s = self.state[p]
            g = p.grad.clone()
            s["buf"] = g if "buf" not in s else s["buf"] * self.momentum + g
            if p.dim() == 4:
                w_old = p.data.clone()
                z = s.setdefault("z", torch.zeros_like(p))
                gamma = s.setdefault("gamma", torch.zeros_like(p))
                p.data = p.data - self.lr * self.kappa * (s["buf"] + (w_old - gamma) / self.mu)
                s["z"] = z + self.lr / self.mu * (w_old - gamma)
                norms = s["z"].view(s["z"].shape[0], -1).norm(dim=1)
                shrink = torch.clamp(1 - 1 / norms, min=0).view(-1, 1, 1, 1)
                s["gamma"] = self.kappa * s["z"] * shrink
            else:
                p.data = p.data - self.lr * self.kappa * s["buf"]


def vgg(name: str) -> nn.Module:
    from grow.spec import build
    from search_spaces import vgg as space
    spec = space.seed((3, 32, 32), 10) if name == "vgg-seed" else space.classic(name, (3, 32, 32), 10)
    return build(spec)


MODELS = {"cnn": cnn, "vgg-seed": lambda: vgg("vgg-seed"), "vgg11": lambda: vgg("vgg11")}


def time_steps(make, model, grads, steps):
    opt = make(model.parameters())
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    for _ in range(10):
        opt.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def optimizers(lr: float) -> list[tuple]:
    """(label, factory) of torch SGD and DessiLBI on both of its paths, at learning rate `lr`."""
    return [
        ("torch.optim.SGD (momentum 0.9, foreach)",
         lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9, foreach=True)),
        ("grow.DessiLBI (fused CPU kernel, default)", lambda ps: DessiLBI(ps, lr=lr, mu=100.0)),
        ("grow.DessiLBI (foreach, as on CUDA)", lambda ps: DessiLBI(ps, lr=lr, mu=100.0, fused=False)),
    ]


def bench_model(name: str, steps: int, threads: int) -> None:
    torch.manual_seed(0)
    model = MODELS[name]()
    loss = nn.functional.cross_entropy(model(torch.rand(32, 3, 32, 32)), torch.randint(0, 10, (32,)))
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    n = sum(p.numel() for p in model.parameters())
    rows = optimizers(0.1) + [("seed-style per-parameter loop", lambda ps: SeedStyleLBI(ps, lr=0.1, mu=100.0))]
    results = [(label, time_steps(make, model, grads, steps)) for label, make in rows]
    sgd = results[0][1]
    print(f"\n{name}: {n / 1e6:.2f}M parameters ({len(grads)} tensors), CPU, {threads} thread(s), "
          f"median of {steps} steps")
    print(f"{'optimizer':42s} {'ms/step':>9s} {'vs SGD':>8s}")
    for label, t in results:
        print(f"{label:42s} {1e3 * t:9.3f} {t / sgd:7.2f}x")


def train_steps(name: str, batch: int, steps: int, threads: int) -> None:
    """Whole training steps (forward, backward, step; channels_last as grow trains) per optimizer."""
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    print(f"\n{name}: whole training steps, batch {batch}, 32x32, {threads} thread(s), median of {steps}")
    sgd = None
    for label, make in optimizers(0.01):
        torch.manual_seed(0)
        model = MODELS[name]().to(memory_format=torch.channels_last)
        opt = make(model.parameters())
        times = []
        for i in range(steps + 5):
            t0 = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if i >= 5:
                times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        sgd = sgd or t
        print(f"{label:42s} {1e3 * t:9.2f} ms {t / sgd:7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default="cnn,vgg-seed,vgg11",
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--train-batch", type=int, default=128,
                        help="also time whole training steps at this batch size (0: skip)")
    parser.add_argument("--train-model", default="vgg-seed", choices=list(MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        bench_model(name, args.steps, args.threads)
    if args.train_batch:
        train_steps(args.train_model, args.train_batch, 30, args.threads)


if __name__ == "__main__":
    main()
