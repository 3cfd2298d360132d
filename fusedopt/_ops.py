"""Loads the C++ extension, which registers the fusedopt ops (schemas in csrc/fusedopt.cpp), and
gives each op its fake implementation, so torch.compile and torch.library.opcheck can trace them.
Every op here mutates its inputs and returns nothing, so the fake has nothing to compute."""

from __future__ import annotations

import torch

LOAD_ERROR: str | None = None
try:
    from fusedopt import _C  # noqa: F401  (loading it registers the ops)
except ImportError as error:  # the extension was not built here; the reference backend remains
    LOAD_ERROR = f"{type(error).__name__}: {error}"

LOADED = LOAD_ERROR is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the extension registered an implementation of `op` for this dispatch key."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


if LOADED:

    @torch.library.register_fake("fusedopt::adam_")
    def _adam_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs):
        return None

    @torch.library.register_fake("fusedopt::adam_.tensor_lr")
    def _adam_tensor_lr_fake(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, **kwargs
    ):
        return None

    @torch.library.register_fake("fusedopt::lion_")
    def _lion_fake(params, grads, exp_avgs, **kwargs):
        return None

    @torch.library.register_fake("fusedopt::lion_.tensor_lr")
    def _lion_tensor_lr_fake(params, grads, exp_avgs, **kwargs):
        return None

    @torch.library.register_fake("fusedopt::sgd_")
    def _sgd_fake(params, grads, momentum_buffers, **kwargs):
        return None

    @torch.library.register_fake("fusedopt::sgd_.tensor_lr")
    def _sgd_tensor_lr_fake(params, grads, momentum_buffers, **kwargs):
        return None

    @torch.library.register_fake("fusedopt::stream_rmw_")
    def _stream_rmw_fake(outs, src):
        return None
