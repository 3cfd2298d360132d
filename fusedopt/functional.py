"""The dispatch layer: one function per algorithm. Each takes tensors that share one device and
dtype, picks a backend (fusedopt._backends.resolve), puts scalar tensors on that device and calls
the kernel. The math of each function is the same-named function in fusedopt.reference."""

from __future__ import annotations

import torch
from torch import Tensor

from fusedopt import _backends, reference


def _on(device: torch.device, t: Tensor | None) -> Tensor | None:
    """A scalar tensor (lr, grad_scale, found_inf) on the params' device, without a host sync."""
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def _split_contiguous(lists: tuple[list[Tensor], ...]) -> tuple[list, list]:
    """Parallel tensor lists split in two: indices whose tensors are all contiguous, and the rest.
    The last list (state_steps) holds scalars and decides nothing."""
    tensor_lists = [lst for lst in lists[:-1] if lst]
    keep = [all(lst[i].is_contiguous() for lst in tensor_lists) for i in range(len(lists[0]))]
    if all(keep):
        return list(lists), [[] for _ in lists]
    pick = [[[t for t, k in zip(lst, keep) if k == wanted] if lst else [] for lst in lists]
            for wanted in (True, False)]
    return pick[0], pick[1]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    eps: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    backend: str = "auto",
) -> None:
    """One Adam (decoupled_weight_decay=False) or AdamW step, in place; see reference.adam.

    Advances every state_steps[i] by one; with grad_scale, leaves the grads unscaled; with a
    non-zero found_inf, changes nothing."""
    if not params:
        return
    device = params[0].device
    name = _backends.resolve(backend, device)
    tensor_lr = isinstance(lr, Tensor)
    if tensor_lr and name != "reference":
        lr = _on(device, lr.to(torch.float32) if lr.dtype != torch.float32 else lr)
    args = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [], state_steps)
    kwargs = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=amsgrad,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        grad_scale=_on(device, grad_scale),
        found_inf=_on(device, found_inf),
    )
    if name in ("cpp", "cuda"):
        op = torch.ops.fusedopt.adam_
        (op.tensor_lr if tensor_lr else op.default)(*args, **kwargs)
    elif name == "triton":
        from fusedopt.kernels import adam as triton_adam

        flat, strided = _split_contiguous(args)
        triton_adam.adam(*flat, **kwargs)
        reference.adam(*strided, **kwargs)  # rare: the Triton kernels stream flat arrays
    else:
        reference.adam(*args, **kwargs)
