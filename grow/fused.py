"""DessiLBI's step for one CPU tensor in a single pass over memory (compiled with numba).

With separate tensor operations a DessiLBI step reads and writes every structured weight about
eighteen times (momentum, Z, the pull towards Gamma, the gradient step, the norms, Gamma) against
torch SGD's eight; on a CPU that is the whole cost. Here one loop per tensor reads W, grad,
momentum, Z and Gamma once and writes them once; Gamma of a filter is written from Z while the
filter is still in cache. The arithmetic is the same as the foreach path in ``grow.optim``
(tests compare both with the equations), and tensors it cannot take go there instead.

Large tensors are split by rows over torch's thread count (torch's own elementwise kernels do
the same from 32K elements on); small ones stay on the calling thread, where starting threads
would cost more than the work.
"""
from __future__ import annotations

import types
from typing import Optional

import torch

PLAIN, FILTER, ELEMENT = 0, 1, 2
_MODES = {None: PLAIN, "filter": FILTER, "element": ELEMENT}
_DTYPES = (torch.float32, torch.float64)
PARALLEL_MIN = 1 << 15
_kernels: dict[bool, object] = {}


def _kernel(parallel: bool):
    if parallel not in _kernels:
        _kernels[parallel] = _compile(parallel)
    return _kernels[parallel]


def _compile(parallel: bool):
    """Import numba on first use (it costs half a second) and build the kernel."""
    import numba
    import numpy as np

    # reassoc lets the norm's running sum vectorise; no flag that assumes finite values, so a
    # NaN gradient still reaches the weights and the training loop sees the divergence
    def step(w, g, buf, z, gamma, mode, lr, kappa, mu, momentum, keep, weight_decay, nesterov, first):
        dt = w.dtype.type
        a, b, c = dt(lr * kappa / mu), dt(lr * kappa), dt(lr / mu)
        m, kp, wd, kap = dt(momentum), dt(keep), dt(weight_decay), dt(kappa)
        rows, cols = w.shape
        for r in numba.prange(rows):
            acc = dt(0.0)
            for i in range(cols):
                d = g[r, i] + wd * w[r, i]
                if momentum != 0.0:
                    v = d if first else m * buf[r, i] + kp * d
                    buf[r, i] = v
                    d = d + m * v if nesterov else v
                if mode == PLAIN:
                    w[r, i] -= b * d
                    continue
                diff = w[r, i] - gamma[r, i]
                w[r, i] -= b * d + a * diff
                zi = z[r, i] + c * diff
                z[r, i] = zi
                if mode == ELEMENT:
                    gamma[r, i] = kap * (max(zi - dt(1.0), dt(0.0)) + min(zi + dt(1.0), dt(0.0)))
                else:
                    acc += zi * zi
            if mode == FILTER:
                norm = np.sqrt(acc)
                shrink = kap * max(dt(1.0) - dt(1.0) / norm, dt(0.0)) if norm > 0 else dt(0.0)
                for i in range(cols):
                    gamma[r, i] = shrink * z[r, i]

    if parallel:  # numba's on-disk cache knows a function by name and line, not by its options
        step = types.FunctionType(step.__code__, step.__globals__, "step_parallel", None, step.__closure__)
        step.__qualname__ = "_compile.<locals>.step_parallel"
    return numba.njit(cache=True, parallel=parallel, fastmath={"reassoc", "contract", "nsz"})(step)


def _use_threads(threads: int) -> None:
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def _rows(t: torch.Tensor, rows: int):
    """The tensor's memory as a (rows, n/rows) numpy view; a channels_last weight is read in its
    own memory order (elementwise work does not care, as long as all tensors share the order)."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.permute(0, 2, 3, 1)
    return t.numpy().reshape(rows, -1)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))


class FusedStepper:
    """Runs the kernel for one optimizer's tensors.

    It keeps the numpy views of each parameter and its state between steps, because making them
    costs more than stepping a small tensor; a view is remade when any tensor's memory moved
    (load_state_dict, a replaced ``.data``). The views hold their tensors, so an address that is
    still in the key cannot have been reused by another tensor.
    """

    def __init__(self) -> None:
        self._views: dict[torch.Tensor, tuple] = {}
        self._threads = 0

    def step(self, p: torch.Tensor, state: list[Optional[torch.Tensor]], structure: Optional[str],
             group: dict, first: bool) -> bool:
        """One step of ``p`` in place, state = [momentum buffer, Z, Gamma] (None where absent);
        False, with nothing changed, for tensors the kernel cannot take."""
        grad = p.grad
        if grad.device.type != "cpu" or grad.dtype != p.dtype or grad.stride() != p.stride():
            return False
        key = tuple(0 if t is None else t.data_ptr() for t in [p] + state)
        cached = self._views.get(p)
        if cached is None or cached[0] != key:
            present = [p] + [t for t in state if t is not None]
            if not can_fuse(present):
                return False
            rows = p.shape[0] if p.dim() > 1 else 1
            arrays = [_rows(t, rows) if t is not None else None for t in [p] + state]
            cached = self._views[p] = (key, rows, [a if a is not None else arrays[0] for a in arrays])
        _, rows, (w, buf, z, gamma) = cached
        threads = torch.get_num_threads()
        parallel = threads > 1 and rows > 1 and w.size >= PARALLEL_MIN
        kernel = _kernel(parallel)
        if parallel and threads != self._threads:
            _use_threads(threads)
            self._threads = threads
        kernel(w, _rows(grad, rows), buf, z, gamma, _MODES[structure], group["lr"], group["kappa"],
                group["mu"], group["momentum"], 1.0 - group["dampening"], group["weight_decay"],
                group["nesterov"], first)
        return True


def can_fuse(tensors: list[torch.Tensor]) -> bool:
    """True when every tensor is a dense CPU float32/float64 tensor laid out like the first."""
    w = tensors[0]
    if w.device.type != "cpu" or w.dtype not in _DTYPES or w.numel() == 0 or not _dense(w):
        return False
    return all(t.dtype == w.dtype and t.stride() == w.stride() and t.shape == w.shape for t in tensors[1:])
