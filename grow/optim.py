"""DessiLBI: the Linearized Bregman Iteration optimizer that evolves the structure parameter Gamma."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.optim import Optimizer

from grow.fused import FusedStepper

STRUCTURES = ("filter", "element", None)


def _structure_for(p: torch.Tensor, requested) -> Optional[str]:
    if requested != "auto":
        return requested
    dim = p.dim()
    return "filter" if dim == 4 else "element" if dim == 2 else None


class DessiLBI(Optimizer):
    r"""Deep structure splitting Linearized Bregman Iteration (Fu et al., TPAMI 2022).

    For every structured weight W it keeps Z and Gamma (both start at zero) and does

        g     = grad L(W) (+ weight_decay * W), with heavy-ball momentum as torch SGD does it
        W    <- W - lr * kappa * (g + (W - Gamma) / mu)
        Z    <- Z + (lr / mu) * (W_old - Gamma)
        Gamma = kappa * prox(Z)

    prox is the group soft-threshold per output filter for conv weights ("filter":
    Z_g * max(0, 1 - 1/||Z_g||)) and the element soft-threshold for matrices ("element":
    sign(z) * max(0, |z| - 1)). Gamma starts at zero and fills in along training: a filter is
    *selected* once its Gamma group is non-zero. Weights without structure take plain SGD steps
    W <- W - lr * kappa * g.

    Param groups may set ``structure`` to "filter", "element", None or "auto" (the default:
    4-D weights are filters, 2-D weights elements, the rest unstructured). Weight decay is added
    to the gradient of every parameter of a group with ``weight_decay > 0``, structured or not,
    exactly as torch SGD does; pass groups to exempt BatchNorm or biases.

    ``fused`` (default True): dense float32/float64 CPU tensors are stepped by a compiled kernel
    (``grow.fused``) that reads and writes each tensor once, instead of the ~18 passes of separate
    tensor operations; a step then costs about 1.4x torch SGD's instead of 2.9x (bench/optimizer.py).
    Other tensors (CUDA, half precision, unusual layouts) take the foreach path, which computes the
    same equations. Tensors of 32K elements or more are split by rows over torch's thread count.

    Example::

        opt = DessiLBI(model.parameters(), lr=0.1, kappa=1.0, mu=20.0)
        loss.backward(); opt.step()
        conv = model.features[0].weight
        opt.selection_ratio(conv), opt.selected(conv), opt.w_star(conv)
    """

    def __init__(self, params: Iterable, lr: float, kappa: float = 1.0, mu: float = 100.0,
                 momentum: float = 0.9, weight_decay: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, structure="auto", fused: bool = True):
        if lr <= 0 or kappa <= 0 or mu <= 0:
            raise ValueError(f"lr, kappa and mu must be positive, got lr={lr}, kappa={kappa}, mu={mu}")
        if momentum < 0 or weight_decay < 0:
            raise ValueError("momentum and weight_decay must be non-negative")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum needs momentum > 0 and dampening 0")
        defaults = dict(lr=lr, kappa=kappa, mu=mu, momentum=momentum, weight_decay=weight_decay,
                        dampening=dampening, nesterov=nesterov, structure=structure, fused=fused)
        super().__init__(params, defaults)
        self._fused = FusedStepper()
        for group in self.param_groups:
            if group["structure"] not in STRUCTURES + ("auto",):
                raise ValueError(f"structure must be 'filter', 'element', None or 'auto', got {group['structure']!r}")

    # --- the step --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if group.get("fused", True):  # state dicts from before the option lack the key
            params = [p for p in params if not self._fused_step(group, p)]
        if not params:
            return
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if group["momentum"]:
            grads = self._momentum(group, params, grads)
        kinds = [_structure_for(p, group["structure"]) for p in params]
        plain = [i for i, k in enumerate(kinds) if k is None]
        if plain:
            torch._foreach_add_([params[i] for i in plain], [grads[i] for i in plain],
                                alpha=-group["lr"] * group["kappa"])
        if len(plain) < len(params):
            lbi = [i for i, k in enumerate(kinds) if k is not None]
            self._lbi_step(group, [params[i] for i in lbi], [grads[i] for i in lbi], [kinds[i] for i in lbi])

    def _fused_step(self, group: dict, p: torch.Tensor) -> bool:
        """Step ``p`` in one pass over memory if it is a dense CPU float tensor; False if not."""
        structure = _structure_for(p, group["structure"])
        state = self.state[p]
        first = group["momentum"] != 0 and "momentum_buffer" not in state
        if first:
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if structure is not None and "z" not in state:
            self._init_lbi_state(state, p)
        tensors = [state.get(k) for k in ("momentum_buffer", "z", "gamma")]
        if self._fused.step(p, tensors, structure, group, first):
            return True
        if _adopt_layout(state, p):  # e.g. the model went channels_last after its state was made
            tensors = [state.get(k) for k in ("momentum_buffer", "z", "gamma")]
            if self._fused.step(p, tensors, structure, group, first):
                return True
        if first:  # the foreach path starts the buffer from the gradient itself
            del state["momentum_buffer"]
        return False

    def _momentum(self, group, params, grads):
        """buf <- momentum * buf + (1 - dampening) * g, in one pass per tensor where dampening is 0.

        (torch._foreach_mul_ with a Python scalar makes a scalar tensor per tensor on CPU, so the
        plain loop is cheaper there.)
        """
        momentum, keep = group["momentum"], 1 - group["dampening"]
        bufs = []
        for p, g in zip(params, grads):
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = g.detach().clone()
            elif keep == 1:
                torch.add(g, buf, alpha=momentum, out=buf)
            else:
                buf.mul_(momentum).add_(g, alpha=keep)
            bufs.append(buf)
        if group["nesterov"]:
            return torch._foreach_add(grads, bufs, alpha=momentum)
        return bufs

    def _lbi_step(self, group, params, grads, kinds) -> None:
        lr, kappa, mu = group["lr"], group["kappa"], group["mu"]
        zs, gammas = [], []
        for p in params:
            state = self.state[p]
            if "z" not in state:
                self._init_lbi_state(state, p)
            zs.append(state["z"])
            gammas.append(state["gamma"])
        # Z += (lr/mu) (W - Gamma), with W before this step ...
        torch._foreach_add_(zs, params, alpha=lr / mu)
        torch._foreach_add_(zs, gammas, alpha=-lr / mu)
        # ... then W <- W - lr kappa (g + (W - Gamma)/mu), as a lerp towards Gamma and a gradient step
        torch._foreach_lerp_(params, gammas, lr * kappa / mu)
        torch._foreach_add_(params, grads, alpha=-lr * kappa)
        filters = [i for i, k in enumerate(kinds) if k == "filter"]
        if filters:
            _group_prox([zs[i] for i in filters], [gammas[i] for i in filters], kappa)
        for z, gamma, kind in zip(zs, gammas, kinds):
            if kind == "element":
                torch.mul(nn.functional.softshrink(z, 1.0), kappa, out=gamma)

    @staticmethod
    def _init_lbi_state(state: dict, p: torch.Tensor) -> None:
        state["z"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["gamma"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _structure(self, p: torch.Tensor, group: dict) -> Optional[str]:
        return _structure_for(p, group["structure"])

    # --- readouts ------------------------------------------------------------------------
    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise ValueError("this tensor is not a parameter of the optimizer")

    def structure_of(self, p: torch.Tensor) -> Optional[str]:
        """'filter', 'element' or None for a parameter of this optimizer."""
        return self._structure(p, self._group_of(p))

    def gamma(self, p: torch.Tensor) -> torch.Tensor:
        self._require_structure(p)
        return self.state[p].get("gamma", torch.zeros_like(p))

    def z(self, p: torch.Tensor) -> torch.Tensor:
        self._require_structure(p)
        return self.state[p].get("z", torch.zeros_like(p))

    def _require_structure(self, p: torch.Tensor) -> str:
        structure = self.structure_of(p)
        if structure is None:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has no structure, so it has no Gamma")
        return structure

    def gamma_norms(self, p: torch.Tensor) -> torch.Tensor:
        """l2 norm of Gamma per output filter (per row for matrices)."""
        return torch.linalg.vector_norm(self.gamma(p).flatten(1), dim=1)

    def selected(self, p: torch.Tensor) -> torch.Tensor:
        """Boolean mask: per output filter (filter structure) or per entry (element structure)."""
        if self._require_structure(p) == "filter":
            return self.gamma_norms(p) > 0
        return self.gamma(p) != 0

    def selection_ratio(self, p: torch.Tensor) -> float:
        """Share of filters (or entries) whose Gamma is non-zero."""
        return float(self.selected(p).float().mean())

    def w_star(self, p: torch.Tensor) -> torch.Tensor:
        """W * 1[Gamma != 0]: the sparse weight the paper prunes to (whole filters for convs)."""
        mask = self.selected(p)
        if mask.dim() == 1:
            mask = mask.view(-1, *([1] * (p.dim() - 1)))
        return p.detach() * mask


def _adopt_layout(state: dict, p: torch.Tensor) -> bool:
    """Give state tensors the memory layout of their parameter; True if any changed."""
    changed = False
    for key, t in state.items():
        if torch.is_tensor(t) and t.shape == p.shape and t.stride() != p.stride():
            state[key] = torch.empty_like(p, memory_format=torch.preserve_format).copy_(t)
            changed = True
    return changed


def _group_prox(zs: list[torch.Tensor], gammas: list[torch.Tensor], kappa: float) -> None:
    """Gamma_g = kappa * Z_g * max(0, 1 - 1/||Z_g||) for every output filter g of every tensor.

    One norm kernel per tensor; the shrink factors of all filters of all tensors in one vector
    (a handful of kernels in all, instead of a handful per tensor); one multiply per tensor
    writes Gamma in place.
    """
    norms = torch.cat([torch.linalg.vector_norm(z, dim=tuple(range(1, z.dim()))) for z in zs])
    shrink = norms.clamp_(min=1e-30).reciprocal_().mul_(-kappa).add_(kappa).clamp_(min=0)
    for z, gamma, factor in zip(zs, gammas, shrink.split([z.shape[0] for z in zs])):
        torch.mul(z, factor.view(-1, *([1] * (z.dim() - 1))), out=gamma)
