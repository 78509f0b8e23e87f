"""One growth run across processes: torchrun's environment, DistributedDataParallel, and checks.

Launched by `torchrun --nproc_per_node N cli.py grow ...`, every process (rank) runs the same
growth loop on its slice of every global batch; DDP all-reduces the gradients, so DessiLBI steps on
identical gradients and Z and Gamma stay identical on every rank. Growth decisions read Gamma, so
they come out the same everywhere; `check_identical` verifies that after every round (a mismatch
is an error, never a silent drift). Started as a plain process, everything here is a no-op and the
run is the single-process run it always was.

BatchNorm is synchronised (statistics of the whole global batch, `GlobalBatchNorm2d`), so N
processes with a global batch B compute what one process with batch B computes, up to float
rounding: same decisions, same architectures, the same weights within float tolerance.
"""
from __future__ import annotations

import atexit
import math
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn

from grow.errors import GrowError


@dataclass(frozen=True)
class Context:
    """Where this process stands in the job: rank, number of processes, rank on this node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder and draws the display; the others only train."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Context()
# A process that waits this long on a collective gives up (torchrun normally stops the job first,
# as soon as one rank dies). Long enough for rank 0 to write a checkpoint or plot a figure.
TIMEOUT = timedelta(minutes=30)


def launched() -> bool:
    """Started by torchrun (or any launcher setting its variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current() -> Context:
    """This process's place in the job; SINGLE when no process group is running."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def join(device: torch.device, run_folder: str = "RUN_FOLDER") -> Context:
    """Join the torchrun job this process belongs to (gloo on CPU, nccl on CUDA), once.

    Reads torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. A process not
    started by torchrun gets SINGLE and no process group. The group is left at exit.
    `run_folder` goes into the message printed if torchrun stops this process.
    """
    global _run_folder
    if not launched():
        return SINGLE
    _run_folder = run_folder
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device))
        dist.init_process_group(backend, timeout=TIMEOUT)
        atexit.register(leave)
        signal.signal(signal.SIGTERM, _stopped_by_launcher)
    return current()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_run_folder = "RUN_FOLDER"
EXIT_PEER_FAILED = 3


def _stopped_by_launcher(signum, frame) -> None:
    """torchrun sends SIGTERM to the other ranks when one of them dies: say so, in one line."""
    ctx = current()
    print(f"error: rank {ctx.rank} stopped by torchrun (another process of this job failed, or the job was "
          f"stopped); every finished round is kept in {_run_folder}; continue with: torchrun --nproc_per_node "
          f"{ctx.world_size} cli.py grow --resume {_run_folder}", file=sys.stderr, flush=True)
    os._exit(EXIT_PEER_FAILED)


def local_device(device: torch.device) -> torch.device:
    """Under torchrun, CUDA means this node's GPU number LOCAL_RANK; CPU stays CPU."""
    if device.type != "cuda" or not launched():
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def describe(batch_size: int, ctx: Optional[Context] = None) -> dict:
    """The layout of the run, for history.json: processes, global and per-process batch."""
    ctx = ctx or current()
    return {"world_size": ctx.world_size, "global_batch_size": batch_size,
            "per_rank_batch_size": batch_size // ctx.world_size,
            "backend": dist.get_backend() if ctx.distributed else None}


def check_batch_size(batch_size: int, ctx: Optional[Context] = None) -> None:
    """--batch-size is the global batch: it must split evenly over the processes, or the ranks'
    mean losses would weigh images unequally and the run would not match one process."""
    ctx = ctx or current()
    if batch_size % ctx.world_size:
        raise GrowError(f"--batch-size {batch_size} is the global batch and must be divisible by the "
                        f"{ctx.world_size} processes of this torchrun job")


# --- collectives ------------------------------------------------------------------------------
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `t` (a new tensor); `t` itself when running alone."""
    if not current().distributed:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a choice that rests on one machine's state, such as its free
    memory, must still be one choice); `value` itself when running alone."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def peer_failure(err: BaseException) -> bool:
    """Whether `err` means another rank of the job went away (crashed, killed, timed out)."""
    if not current().distributed:
        return False
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL", "Timed out",
        "ProcessGroup", "gloo"))


def peer_failure_error(err: BaseException, out: str) -> GrowError:
    ctx = current()
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return GrowError(f"rank {ctx.rank} lost contact with another process of this torchrun job ({first[:160]}); "
                     f"every finished round is kept in {out}; continue with: torchrun --nproc_per_node "
                     f"{ctx.world_size} cli.py grow --resume {out}")


# --- the model --------------------------------------------------------------------------------
class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient: the gradient of a sum over ranks is the sum over ranks
    of the gradients, which is how every rank's loss reaches every other rank's activations."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        t = t.clone()
        dist.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch over all ranks.

    torch's SyncBatchNorm refuses CPU tensors, and it is not a BatchNorm2d, so growth (which reads
    and writes BatchNorm2d layers) would not know it. This one is a BatchNorm2d: same parameters,
    buffers and state_dict keys; in eval mode, or with no process group, it is exactly BatchNorm2d.
    In training it all-reduces per-channel sums (float64, one collective per layer and pass) and
    normalises with the global mean and biased variance, updating the running statistics as
    BatchNorm2d does for a batch of the global size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and current().distributed):
            return super().forward(x)
        dims = (0, 2, 3)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        count = x.numel() // x.shape[1]
        # Per rank, the sum and the squared deviations from this rank's own mean (two passes: squares
        # of raw activations lose the variance of a nearly constant channel to rounding); summed over
        # ranks as sum and sum of squares in float64, where the same cancellation costs nothing.
        local_sum = xf.sum(dims, dtype=torch.float64)
        local_mean = local_sum / count
        deviations = ((xf - local_mean.to(xf.dtype).view(1, -1, 1, 1)) ** 2).sum(dims, dtype=torch.float64)
        local = torch.stack([local_sum, deviations + count * local_mean * local_mean])
        sums = _SumOverRanks.apply(torch.cat([local, local.new_full((2, 1), float(count))], dim=1))
        n = sums[0, -1].detach()  # a tensor: no host sync per layer on a GPU
        mean = sums[0, :-1] / n
        var = (sums[1, :-1] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            self._update_running(mean, var, n)
        shape = (1, -1, 1, 1)
        scale = torch.rsqrt(var + self.eps).to(x.dtype if x.dtype == torch.float64 else torch.float32)
        y = (x - mean.to(scale.dtype).view(shape)) * scale.view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * (n / (n - 1).clamp_min(1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)


def sync_batchnorm_(model: nn.Module) -> nn.Module:
    """Turn every BatchNorm2d of `model` into a GlobalBatchNorm2d in place. The class of each
    module object changes, nothing else: the very same parameter and buffer tensors stay (the
    optimizer's state is keyed by them), and so do every name and every state_dict key."""
    for module in model.modules():
        if type(module) is nn.BatchNorm2d:
            module.__class__ = GlobalBatchNorm2d
    return model


def plain_batchnorm_(model: nn.Module) -> nn.Module:
    """Undo sync_batchnorm_: the model a run returns holds only standard modules."""
    for module in model.modules():
        if type(module) is GlobalBatchNorm2d:
            module.__class__ = nn.BatchNorm2d
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """What trains under torchrun: `model` (BatchNorm synchronised, channels_last already applied)
    in DistributedDataParallel. Alone, `model` itself. DDP starts by broadcasting rank 0's weights
    and buffers, so every rank trains the same network even if a morph drew different numbers."""
    if not current().distributed:
        return model
    sync_batchnorm_(model)
    device_ids = [device.index] if device.type == "cuda" else None
    # The synchronised statistics are the same on every rank: buffers are broadcast once, at the
    # start, not before every forward pass.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)


# --- the check --------------------------------------------------------------------------------
def fingerprint(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[float]:
    """Three numbers per tensor (sum, sum of magnitudes, a position-weighted sum) of every weight,
    buffer and optimizer state tensor (momentum, Z, Gamma): equal lists mean equal states up to
    float rounding, and a swapped or shifted entry changes the weighted sum."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    for p in model.parameters():
        state = optimizer.state.get(p, {})
        tensors += [state[k] for k in sorted(state) if torch.is_tensor(state[k]) and state[k].dim() > 0]
    out: list[float] = []
    for t in tensors:
        flat = t.detach().reshape(-1).double()
        weights = torch.sin(torch.arange(flat.numel(), dtype=torch.float64, device=flat.device))
        out += [float(flat.sum()), float(flat.abs().sum()), float((flat * weights).sum())]
    return out


def check_identical(model: nn.Module, optimizer: torch.optim.Optimizer, decisions: Any, label: str,
                    rel_tol: float = 1e-5) -> None:
    """Raise GrowError on every rank if any rank's architecture, growth decisions, weights or
    optimizer state (Z, Gamma, momentum) differ from rank 0's. Every rank gathers every rank's
    summary and reaches the same verdict, so no rank is left waiting on a collective."""
    ctx = current()
    if not ctx.distributed:
        return
    mine = (model.spec.to_json(), decisions, fingerprint(model, optimizer))
    gathered: list = [None] * ctx.world_size
    dist.all_gather_object(gathered, mine)
    ref = gathered[0]
    for rank, other in enumerate(gathered[1:], 1):
        if other[0] != ref[0] or other[1] != ref[1]:
            raise GrowError(f"{label}: rank {rank} grew a different network than rank 0; the ranks must "
                            "run the same code on the same data")
        scale = max((abs(v) for v in ref[2]), default=1.0)
        bad = [i for i, (a, b) in enumerate(zip(ref[2], other[2]))
               if not math.isclose(a, b, rel_tol=rel_tol, abs_tol=rel_tol * 1e-3 * scale)]
        if len(ref[2]) != len(other[2]) or bad:
            raise GrowError(f"{label}: rank {rank}'s weights or optimizer state (Z, Gamma, momentum) differ "
                            f"from rank 0's ({len(bad)} of {len(ref[2]) // 3} tensors); the ranks have "
                            "drifted apart")
