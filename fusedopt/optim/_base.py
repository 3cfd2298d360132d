"""What every fusedopt optimizer shares with its torch.optim twin and adds to it: the `backend`
keyword, GradScaler support inside the step, and `step` tensors on the params' device."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedopt._registry import BACKENDS


def to_float(value: float | Tensor) -> float:
    """torch accepts 1-element tensors for some hyperparameters and keeps them as floats."""
    return value.item() if isinstance(value, Tensor) else value


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed
    DTensor = None


def _local(t: Tensor) -> Tensor:
    """The tensor the kernels update: a DTensor's local shard (FSDP2: elementwise steps need no
    communication), a complex tensor viewed as real pairs (as torch does)."""
    if DTensor is not None and isinstance(t, DTensor):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def group_tensors(lists: list[list], elementwise: int, has_complex: bool,
                  extra_keys: list | None = None) -> dict[tuple, list[list]]:
    """Parallel lists (lists[0] the params; an empty list stays empty) split into one set per
    (device, dtype[, extra_keys[i]]) of the params. The first `elementwise` lists are shaped like
    the params and become what the kernels update (_local); the rest (step counts) pass as they
    are. Called in step(), outside _init_group, so that torch.compile traces it."""
    params = lists[0]
    if not params:
        return {}

    def key_of(i: int) -> tuple:
        p = params[i]
        return (p.device, p.dtype) if extra_keys is None else (p.device, p.dtype, extra_keys[i])

    first = params[0]
    # The common case, checked in one pass: plain real tensors of one device, dtype and key.
    if not has_complex and all(p.dtype == first.dtype and p.device == first.device
                               and type(p) in _PLAIN_TYPES for p in params) and (
            extra_keys is None or all(k == extra_keys[0] for k in extra_keys)):
        return {key_of(0): lists}
    groups: dict[tuple, list[list]] = {}
    for i in range(len(params)):
        key = key_of(i)
        out = groups.get(key)
        if out is None:
            out = groups[key] = [[] for _ in lists]
        for j, lst in enumerate(lists):
            if lst:
                out[j].append(_local(lst[i]) if j < elementwise else lst[i])
    return groups


def params_with_grads(group: dict[str, Any], sparse_error: str) -> Iterator[tuple[Tensor, Tensor]]:
    """(param, grad) for the group's params that have a grad; a sparse grad raises
    RuntimeError(sparse_error), the optimizer's message as torch words it."""
    for p in group["params"]:
        grad = p.grad
        if grad is None:
            continue
        if grad.is_sparse:
            raise RuntimeError(sparse_error)
        yield p, grad


class FusedOptimizer(Optimizer):
    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if defaults["backend"] not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {defaults['backend']!r}")
        super().__init__(params, defaults)
        # GradScaler hands this optimizer grad_scale / found_inf instead of unscaling grads itself.
        self._step_supports_amp_scaling = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here: groups saved by torch.optim lack our keys (backend), and their
        # `step` may be a float64 CPU tensor (or a number); the kernels read a float32 tensor on
        # the param's device.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    p_state["step"] = self._step_tensor(p, p_state["step"])

    @staticmethod
    def _step_tensor(param: Tensor, value: float | Tensor = 0.0) -> Tensor:
        if isinstance(value, Tensor) and value.device == param.device:
            if value.dtype == torch.float32:
                return value
        return torch.as_tensor(value, dtype=torch.float32).to(param.device).reshape(())

    @staticmethod
    def _evaluate(closure: Callable[[], float] | None) -> float | None:
        """The loss from `closure` (with grad enabled inside step's no_grad), or None."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _amp_args(self) -> dict[str, Tensor | None]:
        return {"grad_scale": getattr(self, "grad_scale", None),
                "found_inf": getattr(self, "found_inf", None)}
