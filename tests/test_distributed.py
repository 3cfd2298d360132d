"""fusedopt optimizers under FSDP2 (fully_shard) and DDP, with gloo on CPU, in 2 and 3 processes
started by the test: training equals single-process training on the whole batch, the step
communicates nothing (but, under FSDP2, Muon's all-gathers of each sharded matrix's update and the
clipping norm's all-reduce), and training resumed from a torch.distributed.checkpoint continues
exactly."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fusedopt

OPTIMIZERS = {
    "AdamW": lambda params: fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1),
    "SGD": lambda params: fusedopt.SGD(params, lr=5e-2, momentum=0.9, nesterov=True,
                                       weight_decay=1e-2),
    "Lion": lambda params: fusedopt.Lion(params, lr=1e-3, weight_decay=0.1),
    # Clipped at every step (the grads' norm here is 0.4 to 0.9): under FSDP2 the norm is the
    # whole model's, all-reduced over the shards.
    "AdamW-clipped": lambda params: fusedopt.AdamW(params, lr=1e-2, max_grad_norm=0.02),
    # The whole model: its weight matrices orthogonalized, its biases by the AdamW inside. fp32
    # Newton-Schulz, so that the ranks' other order of summing grads stays at fp32 rounding.
    "Muon": lambda params: fusedopt.Muon(params, lr=2e-2, ns_dtype=torch.float32),
    # Lean states (the model's tensors are too small for 8-bit ones): bf16 moments, sharded
    # under FSDP2 like the params, and saved / loaded in bf16 by torch.distributed.checkpoint.
    "AdamW-bf16-states": lambda params: fusedopt.AdamW(params, lr=1e-2, weight_decay=0.1,
                                                       state_dtype=torch.bfloat16),
    "Muon-bf16-states": lambda params: fusedopt.Muon(params, lr=2e-2, ns_dtype=torch.float32,
                                                     state_dtype=torch.bfloat16),
}
WRAPPERS = ["fsdp2", "ddp"]
WORLD_SIZES = [2, 3]
BATCH = 6  # divisible by every world size: each rank's mean loss averages to the batch's
STEPS, SAVED_AT = 5, 2

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available here")


def make_model(seed: int = 0) -> torch.nn.Module:
    # 17 rows split unevenly over 3 ranks; the last weight has 2 rows, so one rank of 3 holds an
    # empty shard.
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 17), torch.nn.Tanh(), torch.nn.Linear(17, 2))


def batch(step: int) -> torch.Tensor:
    return torch.randn(BATCH, 8, generator=torch.Generator().manual_seed(100 + step))


def train(model, optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        optimizer.zero_grad()
        model(batch(step).chunk(world)[rank]).square().mean().backward()
        optimizer.step()


def full_params(model) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in model.parameters()]


def rank_ordered_mean(state, bucket):  # no annotation: DDP checks it against its own
    """A DDP comm hook that averages grads in rank order. gloo's all-reduce over 3 ranks does not
    always add in the same order (torch.optim.AdamW's resumed run differs from its continued one
    by an ulp with it too), which would hide whether the optimizer resumes exactly."""
    grads = bucket.buffer()
    parts = [torch.empty_like(grads) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, grads)
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    future = torch.futures.Future()
    future.set_result(total / len(parts))
    return future


def wrap(model, wrapper: str):
    if wrapper == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, rank_ordered_mean)
        return ddp
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def run_case(wrapper: str, name: str, rank: int, world: int, checkpoint: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.tensor.debug import CommDebugMode

    model = wrap(make_model(), wrapper)
    optimizer = OPTIMIZERS[name](model.parameters())
    train(model, optimizer, range(SAVED_AT), rank, world)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=checkpoint)
    optimizer.zero_grad()
    model(batch(SAVED_AT).chunk(world)[rank]).square().mean().backward()
    with CommDebugMode() as comm:
        optimizer.step()
    collectives = {str(op): count for op, count in comm.get_comm_counts().items()}
    train(model, optimizer, range(SAVED_AT + 1, STEPS), rank, world)
    continued = full_params(model)

    resumed_model = wrap(make_model(seed=1), wrapper)  # other values: the load must set them all
    resumed_optimizer = OPTIMIZERS[name](resumed_model.parameters())
    model_state, optim_state = get_state_dict(resumed_model, resumed_optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(resumed_model, resumed_optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    train(resumed_model, resumed_optimizer, range(SAVED_AT, STEPS), rank, world)
    return {"continued": continued, "resumed": full_params(resumed_model),
            "step_collectives": collectives}


def worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        results = {}
        for wrapper in WRAPPERS:
            for name in OPTIMIZERS:
                checkpoint = os.path.join(out_dir, f"{wrapper}-{name}")
                results[wrapper, name] = run_case(wrapper, name, rank, world, checkpoint)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "results.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    """{world: {(wrapper, optimizer): results}}, each world size run once, on first use."""
    runs: dict[int, dict] = {}

    def get(world: int) -> dict:
        if world not in runs:
            with tempfile.TemporaryDirectory() as out_dir:
                init_file = os.path.join(out_dir, "init")
                mp.spawn(worker, args=(world, init_file, out_dir), nprocs=world)
                runs[world] = torch.load(os.path.join(out_dir, "results.pt"))
        return runs[world]

    return get


@pytest.fixture(scope="module")
def single_process_results():
    results = {}
    for name in OPTIMIZERS:
        model = make_model()
        train(model, OPTIMIZERS[name](model.parameters()), range(STEPS))
        results[name] = full_params(model)
    return results


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("wrapper", WRAPPERS)
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_distributed_training_matches_one_process_and_resumes_exactly(
        world, wrapper, name, distributed_results, single_process_results):
    result = distributed_results(world)[wrapper, name]
    # Gradients are averaged over ranks in another order than one process sums the batch.
    for ours, alone in zip(result["continued"], single_process_results[name]):
        torch.testing.assert_close(ours, alone, atol=1e-5, rtol=1e-5)
    for resumed, continued in zip(result["resumed"], result["continued"]):
        torch.testing.assert_close(resumed, continued, atol=0, rtol=0)
    if name.startswith("Muon") and wrapper == "fsdp2":  # an all-gather per weight matrix, no more
        assert list(result["step_collectives"].values()) == [2], result["step_collectives"]
        assert "all_gather" in next(iter(result["step_collectives"]))
    elif name == "AdamW-clipped" and wrapper == "fsdp2":  # the grad norm's one all-reduce
        assert list(result["step_collectives"].values()) == [1], result["step_collectives"]
        assert "all_reduce" in next(iter(result["step_collectives"]))
    else:
        assert result["step_collectives"] == {}
