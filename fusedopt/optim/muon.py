"""fusedopt.Muon: torch.optim.Muon with fused steps, batched and symmetric Newton-Schulz, and a
built-in AdamW for the params Muon should not orthogonalize, so that one optimizer trains a
whole model."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusedopt import functional
from fusedopt.optim import _lean
from fusedopt.optim._base import FusedOptimizer, group_tensors, to_float

# Newton-Schulz coefficient schedules, by name: one (a, b, c) per iteration, the last repeated
# when ns_steps asks for more.
NS_SCHEDULES: dict[str, tuple[tuple[float, float, float], ...]] = {
    # Keller Jordan's quintic, torch.optim.Muon's default.
    "quintic": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al. 2025), the 5-step schedule modded-nanogpt uses.
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")
NS_DTYPES = (None, torch.bfloat16, torch.float16, torch.float32, torch.float64)


def ns_schedule(ns_coefficients: str | Sequence, ns_steps: int) -> tuple[tuple[float, ...], ...]:
    """The (a, b, c) of each of ns_steps iterations, from one triple (every iteration), a
    sequence of triples, or a name in NS_SCHEDULES (their last triple repeated past their end).
    Raises torch.optim.Muon's errors."""
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if isinstance(ns_coefficients, str):
        if ns_coefficients not in NS_SCHEDULES:
            raise ValueError(f"Unknown Newton-Schulz schedule {ns_coefficients!r}; the named ones "
                             f"are {', '.join(NS_SCHEDULES)}")
        schedule = NS_SCHEDULES[ns_coefficients]
    elif len(ns_coefficients) and all(isinstance(c, (int, float)) for c in ns_coefficients):
        if len(ns_coefficients) != 3:
            raise ValueError("Coefficients must be a tuple of exactly 3 values")
        schedule = (tuple(ns_coefficients),)
    else:
        schedule = tuple(tuple(triple) for triple in ns_coefficients)
        if not schedule or any(len(triple) != 3 for triple in schedule):
            raise ValueError("Coefficients must be a tuple of exactly 3 values, or a sequence "
                             "of such (a, b, c) triples, one per iteration")
    return tuple(tuple(float(c) for c in schedule[min(i, len(schedule) - 1)])
                 for i in range(ns_steps))


def adjusted_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's shape-scaled learning rate, for the (rows, cols) matrix a param is
    orthogonalized as (an N-D param: cols = the product of its other dims)."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(rows / cols)  # "spectral_unclamped"


@functools.cache
def _cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): there bf16 GEMMs
    are several times faster than fp32; elsewhere torch emulates them, and far slower."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if any(hasattr(torch.cpu, probe) for probe in probes):
        return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_ns_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The Newton-Schulz dtype when ns_dtype=None: bf16 (torch's choice) on GPUs and on CPUs with
    native bf16 matmuls, fp32 on other CPUs; fp64 for fp64 params."""
    if param_dtype == torch.float64:
        return torch.float64
    if device.type == "cpu" and not _cpu_has_native_bf16():
        return torch.float32
    return torch.bfloat16


class Muon(FusedOptimizer):
    r"""Muon (Jordan et al. 2024): momentum, orthogonalized by Newton-Schulz, for weight matrices;
    AdamW for every other param, in the same optimizer.

    For each param orthogonalized (ndim >= 2, in a group without use_muon=False), with g its
    grad and M its (rows, cols) matrix view (cols = the product of its other dims):

        buf = lerp(buf, g, 1 - momentum)
        u = lerp(g, buf, momentum)  if nesterov  else  buf
        O = NS(u as M):  X = u / max(||u||_F, eps);  per iteration (a, b, c):
                         A = X X^T;  X = a X + (b A + c A A) X
        p = p * (1 - lr * weight_decay) - adjusted_lr * O

    adjusted_lr = lr * sqrt(max(1, rows / cols)) ("original", None), lr * 0.2 *
    sqrt(max(rows, cols)) ("match_rms_adamw") or lr * sqrt(rows / cols) ("spectral_unclamped").
    Params of one shape (and device, dtype) are stacked and orthogonalized in one batched
    iteration. Other params (ndim < 2, or use_muon=False) take an AdamW step with the group's lr
    and weight_decay and its adamw_betas, adamw_eps.

    Args: those of torch.optim.Muon, same defaults: lr=1e-3, weight_decay=0.1, momentum=0.95,
    nesterov=True, ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5,
    adjust_lr_fn=None. ns_coefficients may also be a sequence of (a, b, c) triples (one per
    iteration, the last repeated) or a name in NS_SCHEDULES ("quintic", "polar_express").
    Keyword-only: ns_dtype (None: default_ns_dtype), adamw_betas=(0.9, 0.999), adamw_eps=1e-8,
    state_dtype=None, backend="auto" | "triton" | "cpp" | "reference". Group key use_muon: None
    (by ndim), True or False; see muon_param_groups for the usual split.

    state_dtype (as fusedopt.AdamW's; None: the param's dtype) stores the momentum buffers and
    the AdamW moments in torch.bfloat16, torch.float16, torch.float32, or 8-bit blockwise codes
    (torch.uint8, with "<key>_absmax" scales; tensors under 4,096 elements keep fp32). The rule
    runs in fp32 on the decoded values; see fusedopt.optim._lean for the format.

    State, as torch's: "momentum_buffer" for orthogonalized params; AdamW's "step", "exp_avg",
    "exp_avg_sq" for the others. Under FSDP2 each matrix's update is gathered whole, orthogonalized
    on every rank, and each rank keeps its shard.
    """

    def __init__(
        self,
        params: Any,
        lr: float | Tensor = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: str | Sequence = NS_SCHEDULES["quintic"][0],
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
        *,
        ns_dtype: torch.dtype | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
        state_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        # torch.optim.Muon's checks, messages and exception types.
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
        if not 0.0 <= momentum:
            raise ValueError(f"momentum should be >= 0 but is: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
        if adjust_lr_fn not in ADJUST_LR_FNS:
            raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")
        if ns_dtype not in NS_DTYPES:
            raise ValueError(f"ns_dtype must be one of {NS_DTYPES}, got {ns_dtype}")
        for i, beta in enumerate(adamw_betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= adamw_eps:
            raise ValueError(f"Invalid epsilon value: {adamw_eps}")
        _lean.check_options(state_dtype, False, False, False)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            use_muon=None,
            ns_dtype=ns_dtype,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            state_dtype=state_dtype,
            backend=backend,
        )
        super().__init__(params, defaults)
        # GradScaler unscales the grads itself and skips steps with infs, as for torch's Muon.
        self._step_supports_amp_scaling = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        error = None
        if group["use_muon"] not in (None, True, False):
            error = f"use_muon must be None, True or False, got {group['use_muon']!r}"
        elif group["use_muon"]:
            sizes = [p.size() for p in group["params"] if p.ndim < 2]
            if sizes:
                error = ("Muon orthogonalizes parameters of 2 or more dimensions, but a group "
                         f"with use_muon=True has a parameter with size: {sizes[0]} (leave "
                         "use_muon unset, or False, to step it with AdamW)")
        if error:
            self.param_groups.pop()  # the optimizer stays as it was
            raise ValueError(error)

    @staticmethod
    def _orthogonalized(group: dict[str, Any], p: Tensor) -> bool:
        use_muon = group["use_muon"]
        return p.ndim >= 2 if use_muon is None else use_muon

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Performs one optimization step; `closure` re-evaluates the model and returns the loss."""
        loss = self._evaluate(closure)
        for group in self.param_groups:
            # Muon params by (device, dtype, shape, DTensor, buffer dtype): each key is one
            # batched iteration; lists: params, grads, buffers, their absmaxes (8-bit only).
            batches: dict[tuple, list[list[Tensor]]] = defaultdict(lambda: [[], [], [], []])
            # AdamW params by moment dtype: params, grads, exp_avgs, exp_avg_sqs, their absmaxes
            # (8-bit only), steps.
            adamw: dict[torch.dtype, list[list[Tensor]]] = defaultdict(
                lambda: [[], [], [], [], [], [], []])
            for p in group["params"]:
                grad = p.grad
                if grad is None:
                    continue
                if torch.is_complex(p):
                    raise RuntimeError("Muon does not support complex parameters")
                if grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                dtype = _lean.moment_dtype(group, p)
                keys = (("momentum_buffer",) if self._orthogonalized(group, p)
                        else ("exp_avg", "exp_avg_sq"))
                if len(state) == 0 and len(keys) == 2:
                    state["step"] = self._step_tensor(p)
                for key in keys:
                    _lean.conform_moment(state, key, p, dtype)
                absmaxes = [state[f"{key}_absmax"] for key in keys] if dtype == torch.uint8 else []
                if len(keys) == 1:
                    lists = batches[(p.device, p.dtype, p.shape, _lean.is_dtensor(p), dtype)]
                    row = (p, grad, state["momentum_buffer"], *absmaxes)
                else:
                    lists = adamw[dtype]
                    row = (p, grad, state["exp_avg"], state["exp_avg_sq"], *absmaxes)
                    lists[-1].append(state["step"])
                for lst, t in zip(lists, row):
                    lst.append(t)
            if batches:
                self._muon_step(group, batches)
            for lists in adamw.values():
                self._adamw_step(group, lists)
        return loss

    def _muon_step(self, group: dict[str, Any], batches: dict[tuple, list[list[Tensor]]]) -> None:
        lr = to_float(group["lr"])
        schedule = ns_schedule(group["ns_coefficients"], group["ns_steps"])
        for (device, dtype, shape, distributed, _), lists in batches.items():
            params, grads, bufs, absmaxes = lists
            ns_dtype = group["ns_dtype"] or default_ns_dtype(device, dtype)  # (a DTensor's: local)
            kwargs = dict(lr=lr, weight_decay=group["weight_decay"], momentum=group["momentum"],
                          nesterov=group["nesterov"], coefficients=schedule, eps=group["eps"],
                          adjusted_lr=adjusted_lr(lr, group["adjust_lr_fn"], shape),
                          ns_dtype=ns_dtype, backend=group["backend"])
            if distributed:
                _sharded_muon(params, grads, bufs, absmaxes, **kwargs)
            else:
                functional.muon(params, grads, bufs, momentum_buffer_absmaxes=absmaxes, **kwargs)

    def _adamw_step(self, group: dict[str, Any], lists: list[list[Tensor]]) -> None:
        """AdamW for params whose moments share one dtype: adam where they are the params' (as
        torch keeps them), else adam_lean."""
        beta1, beta2 = group["adamw_betas"]
        hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                     eps=group["adamw_eps"], maximize=False, decoupled_weight_decay=True,
                     backend=group["backend"])
        for (_, dtype), (params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                         exp_avg_sq_absmaxes, steps) in group_tensors(lists, 6, False).items():
            if exp_avgs[0].dtype == dtype:
                functional.adam(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False,
                                **hyper)
            else:
                functional.adam_lean(params, grads, exp_avgs, exp_avg_sqs, exp_avg_absmaxes,
                                     exp_avg_sq_absmaxes, [], steps, param_mode="nearest",
                                     **hyper)


def _sharded_muon(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor],
                  absmaxes: list[Tensor], *, lr: float, weight_decay: float, momentum: float,
                  nesterov: bool, coefficients, eps: float, adjusted_lr: float,
                  ns_dtype: torch.dtype, backend: str) -> None:
    """A Muon step of DTensor params (FSDP2) of one global shape: the momentum (8-bit buffers:
    with their absmaxes, empty otherwise) and the update on each rank's shards; in between,
    each update gathered whole (its Newton-Schulz needs the whole matrix), orthogonalized on
    every rank alike, and cut back to this rank's shard."""
    from torch.distributed.tensor import distribute_tensor

    local = [t.to_local() for t in grads], [t.to_local() for t in bufs]
    updates = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in local[0]]
    functional.muon_momentum(updates, *local, momentum=momentum, nesterov=nesterov,
                             momentum_buffer_absmaxes=[t.to_local() for t in absmaxes],
                             backend=backend)
    shape = params[0].shape
    full = torch.stack([_lean.like_param(u, p).full_tensor().reshape(shape[0], -1)
                        for u, p in zip(updates, params)])
    orthogonalized = functional.newton_schulz(full, coefficients, eps, ns_dtype, backend=backend)
    shards = [_own_shard(distribute_tensor, o.view(shape), p)
              for o, p in zip(orthogonalized.unbind(0), params)]
    functional.muon_update([p.to_local() for p in params], shards, lr=lr,
                           weight_decay=weight_decay, adjusted_lr=adjusted_lr, backend=backend)


def _own_shard(distribute_tensor, full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of `full`, laid out as DTensor `like`. Every rank holds the same full
    result, so src_data_rank=None keeps each shard where it is, unsent (a torch without that
    argument scatters rank 0's copy instead: the same values)."""
    try:
        shard = distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:
        shard = distribute_tensor(full, like.device_mesh, like.placements)
    return shard.to_local().contiguous()


def muon_param_groups(
    model: nn.Module,
    *,
    head: nn.Module | Sequence[nn.Module] | None = None,
    adamw_lr: float | None = None,
    adamw_weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Param groups for Muon(...) with the usual split: hidden weight matrices (and conv kernels)
    are orthogonalized; embeddings (nn.Embedding, nn.EmbeddingBag), the output head and every
    param with ndim < 2 (biases, norm weights) take AdamW.

    head: the output module(s); by default the last nn.Linear in model.modules() order (a
    transformer's lm_head, a ConvNet's classifier). A weight tied to an embedding counts once, as
    an embedding. adamw_lr / adamw_weight_decay: the AdamW group's lr and weight_decay (unset:
    the optimizer's defaults). Empty groups are left out.

        optimizer = fusedopt.Muon(fusedopt.muon_param_groups(model, adamw_lr=3e-4), lr=0.02,
                                  adjust_lr_fn="match_rms_adamw")
    """
    if head is None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1:]
    elif isinstance(head, nn.Module):
        head = [head]
    to_adamw = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                for p in m.parameters()}
    to_adamw |= {id(p) for m in head for p in m.parameters()}
    muon, adamw = [], []
    for p in model.parameters():  # each param once, even when tied
        if not p.requires_grad:
            continue
        (adamw if id(p) in to_adamw or p.ndim < 2 else muon).append(p)
    adamw_group: dict[str, Any] = {"params": adamw, "use_muon": False}
    if adamw_lr is not None:
        adamw_group["lr"] = adamw_lr
    if adamw_weight_decay is not None:
        adamw_group["weight_decay"] = adamw_weight_decay
    return [g for g in ({"params": muon, "use_muon": True}, adamw_group) if g["params"]]
