"""What every fusedopt optimizer shares with its torch.optim twin and adds to it: the `backend`
keyword, GradScaler support inside the step, global grad-norm clipping inside the step
(`max_grad_norm`), and `step` tensors on the params' device."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.optim import Optimizer

from fusedopt._registry import BACKENDS
from fusedopt.optim import _lean


def to_float(value: float | Tensor) -> float:
    """torch accepts 1-element tensors for some hyperparameters and keeps them as floats."""
    return value.item() if isinstance(value, Tensor) else value


def local_tensor(t: Tensor) -> Tensor:
    """The tensor the kernels update: a DTensor's local shard (FSDP2: elementwise steps need no
    communication), a complex tensor viewed as real pairs (as torch does)."""
    if _lean.is_dtensor(t):
        t = t.to_local()
    return torch.view_as_real(t) if t.is_complex() else t


_PLAIN_TYPES = (Tensor, torch.nn.Parameter)


def group_tensors(lists: list[list], elementwise: int, has_complex: bool,
                  extra_keys: list | None = None) -> dict[tuple, list[list]]:
    """Parallel lists (lists[0] the params; an empty list stays empty) split into one set per
    (device, dtype[, extra_keys[i]]) of the params. The first `elementwise` lists are shaped like
    the params and become what the kernels update (local_tensor); the rest (step counts) pass as they
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
                out[j].append(local_tensor(lst[i]) if j < elementwise else lst[i])
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


def _total_norm(grads: list[Tensor]) -> Tensor:
    """The 2-norm of all grads together, as torch.nn.utils.clip_grad_norm_ computes it (torch's
    own function where this torch has it, 2.6 and later); a DTensor for DTensor grads."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        return get_total_norm(grads)
    if any(_lean.is_dtensor(g) for g in grads):
        raise NotImplementedError(
            f"fusedopt: max_grad_norm with DTensor (FSDP2) grads needs torch 2.6 or later "
            f"(torch.nn.utils.get_total_norm); this is {torch.__version__}")
    device = grads[0].device
    by_kind: dict[tuple, list[Tensor]] = {}
    for g in grads:
        by_kind.setdefault((g.device, g.dtype), []).append(g)
    norms = [norm.to(device) for kind in by_kind.values() for norm in torch._foreach_norm(kind)]
    return torch.linalg.vector_norm(torch.stack(norms))


class FusedOptimizer(Optimizer):
    def __init__(self, params: Any, defaults: dict[str, Any],
                 max_grad_norm: float | None = None) -> None:
        if max_grad_norm is not None and not 0.0 < max_grad_norm:
            raise ValueError(f"Invalid max_grad_norm: {max_grad_norm}")
        if defaults.get("differentiable"):
            raise RuntimeError("`fused` does not support `differentiable`")
        if defaults.get("fused") and defaults.get("foreach"):
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if defaults["backend"] not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {defaults['backend']!r}")
        super().__init__(params, defaults)
        # GradScaler hands this optimizer grad_scale / found_inf instead of unscaling grads itself.
        self._step_supports_amp_scaling = True
        # One norm over every param of every group, so an optimizer attribute, not a group key.
        self.max_grad_norm = max_grad_norm

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim pickles (and deepcopies) only defaults, state and param_groups: without
        # this, a copied optimizer would silently stop clipping.
        return {**super().__getstate__(), "max_grad_norm": self.max_grad_norm}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here too (with state and param_groups only, so max_grad_norm stays
        # as constructed): groups saved by torch.optim lack our keys (backend), and their
        # `step` may be a float64 CPU tensor (or a number); the kernels read a float32 tensor on
        # the param's device.
        super().__setstate__(state)
        if not hasattr(self, "max_grad_norm"):  # pickled before max_grad_norm existed
            self.max_grad_norm = None
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state:
                    p_state["step"] = self._step_tensor(p, p_state["step"])

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, except that each state tensor keeps the dtype it was saved in: torch
        casts them all to their param's dtype, which would turn 8-bit codes into numbers and
        round fp32 masters and moments to bf16. The next step converts states to the format the
        optimizer's options ask for (so a torch.optim checkpoint loads into 8-bit states, and
        back)."""
        super().load_state_dict(state_dict)
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                loaded = self.state[p].get(key)
                if (key != "step" and isinstance(value, Tensor) and isinstance(loaded, Tensor)
                        and loaded.dtype != value.dtype):
                    self.state[p][key] = value.to(loaded.device, copy=True)

    def full_precision_state_dict(self) -> dict[str, Any]:
        """state_dict() as torch.optim keeps it, for a checkpoint that moves to torch.optim:
        8-bit and low-precision moments in fp32, no absmax scales, master weights or
        compensations (copy the masters into the model first to keep their precision)."""
        out = self.state_dict()
        out["state"] = {key: _lean.full_precision_state(state)
                        for key, state in out["state"].items()}
        return out

    def _lean_batches(self, group: dict[str, Any], keys: tuple[str, ...], sparse_error: str,
                      first_step_key: str | None = None) -> dict[tuple, list[list[Tensor]]]:
        """The lean ops' lists for a lean group's params with grads, one batch per (device,
        param dtype, moment dtype, param_mode, first step): [params, grads, *moments (keys),
        *their absmaxes (uint8 only), param_extras, state_steps], local tensors for DTensor
        params. A param's first step is one whose state lacks first_step_key (SGD's
        momentum_buffer; never, without it). Each param's state is brought to the group's
        options first (fusedopt.optim._lean)."""
        name = type(self).__name__
        batches: dict[tuple, list[list[Tensor]]] = {}
        absmax_keys = [_lean.ABSMAX_KEYS[key] for key in keys]
        modes: dict[torch.dtype, str] = {}  # a param's mode depends only on its dtype here
        for p, grad in params_with_grads(group, sparse_error):
            if p.is_complex():
                raise ValueError(f"fusedopt.{name}: lean states do not support complex params")
            state = self.state[p]
            first_step = first_step_key is not None and first_step_key not in state
            mode = modes.get(p.dtype)
            if mode is None:
                mode = modes[p.dtype] = _lean.param_mode(group, p)
            dtype = _lean.moment_dtype(group, p)
            if "step" not in state:
                state["step"] = self._step_tensor(p)
            for key in keys:
                _lean.conform_moment(state, key, p, dtype)
            extra = _lean.conform_param_extra(state, p, mode)
            absmaxes = [state[key] for key in absmax_keys] if dtype == torch.uint8 else []
            batch_key = (p.device, p.dtype, dtype, mode, first_step)
            lists = batches.get(batch_key)
            if lists is None:
                lists = batches[batch_key] = [[] for _ in range(4 + 2 * len(keys))]
            row = [p, grad, *(state[key] for key in keys), *absmaxes]
            extras = [] if extra is None else [extra]
            if _lean.is_dtensor(p):  # a plain param's states are plain tensors: no lookups
                row, extras = [local_tensor(t) for t in row], [local_tensor(t) for t in extras]
            for column, t in zip(lists, row):
                column.append(t)
            lists[-2] += extras
            lists[-1].append(state["step"])
        return batches

    @staticmethod
    def _count_step(state_steps: list[Tensor], amp: dict[str, Tensor | None]) -> None:
        """Advances the step counts as the lean ops do (not when GradScaler skips the step), for
        a lean group's params that the plain op serves: Lion and SGD keep no count otherwise."""
        found_inf = amp["found_inf"]
        if state_steps:
            torch._foreach_add_(state_steps, 1 if found_inf is None
                                else 1 - found_inf.to(state_steps[0]))

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
        """grad_scale and found_inf for the kernels: GradScaler's, with the max_grad_norm clip
        folded into grad_scale where it is set."""
        grad_scale = getattr(self, "grad_scale", None)
        if self.max_grad_norm is not None:
            grad_scale = self._clipping_grad_scale(grad_scale)
        return {"grad_scale": grad_scale, "found_inf": getattr(self, "found_inf", None)}

    def _clipping_grad_scale(self, grad_scale: Tensor | None) -> Tensor | None:
        """The divisor that clips as torch.nn.utils.clip_grad_norm_(params, max_grad_norm) would
        after GradScaler's unscaling: the kernels divide every grad by grad_scale and store the
        result back, so grad_scale / clip_coef unscales and clips in the step's own pass. The norm
        and the coefficient stay tensors on the device (no host sync)."""
        grads = [p.grad for group in self.param_groups for p in group["params"]
                 if p.grad is not None]
        if not grads:
            return grad_scale
        total = _total_norm(grads)
        if _lean.is_dtensor(total):  # FSDP2: one all-reduce
            total = total.full_tensor()
        # fp32, or fp64 where the grads are (their step computes in fp64).
        dtype = torch.promote_types(total.dtype, torch.float32)
        total, device = total.to(dtype), total.device
        scale = (torch.ones((), device=device, dtype=dtype) if grad_scale is None
                 else grad_scale.to(device, dtype))
        # Scaled grads (GradScaler): the norm of the unscaled ones.
        clip_coef = torch.clamp(self.max_grad_norm / (total / scale + 1e-6), max=1.0)
        return scale / clip_coef
