"""Every Triton kernel compiles offline for sm_90 (PTX and a cubin), in the constexpr variants its
launchers use, on machines without a GPU.

The kernels are not called by hand: each case runs a real launcher (fusedopt.kernels.adam.adam,
lion.lion, sgd.sgd, the lean launchers adam.adam_lean, ..., norm.norm_fwd / norm_bwd,
newton_schulz.gram / gram_polynomial) on small CPU tensors with Triton's launch step
(JITFunction.run) replaced by a recorder, so the signatures, constexprs and launch options
compiled here are exactly the ones the launchers pass; types are Triton's own mangle_type of
each argument, as the JIT derives them. No kernel runs. ASTSource takes signature and constexprs
keyed by argument name from Triton 3.3 on; this file has been run with 3.3.1, 3.6.0 and 3.9.0.
Not reproduced: the divisibility attributes the JIT adds for 16-byte-aligned pointer and integer
arguments, so a per-tensor kernel compiles here as for unaligned tensors (the multi-tensor kernel
states its alignment as the constexpr ALIGNED_16).

Also checked in the compiled code: every launch passes enable_fp_fusion=False (the contraction
policy, docs/numerics.md), so the Adam, Lion and SGD updates hold no fma.rn.f32; and the
multi-tensor kernel's whole blocks (ALIGNED_16) load with 128-bit vector loads (ld.global.v4).

A covering set, not the cross product (3 dtypes x 3 paths x every switch combination is ~1,400
optimizer variants alone; the norms add every power-of-two row block). Per optimizer: every
storage dtype x every path (per-tensor, multi-tensor aligned, multi-tensor unaligned) with all
switches on, so every code path of the update compiles in each dtype; then fp32 with all
switches off (per-tensor and multi-tensor), and fp32 multi-tensor with each switch on alone, so
each `if` compiles in both states. Norms: every dtype x RMS / LayerNorm x row width (one block,
looped) with every feature on (residual, weight, bias, zero-centered weight), fp32 with none,
the widest one-block row, and a residual kept in fp32. Newton-Schulz products: gram and
gram_polynomial in every dtype x every block-table row, with odd sizes, a batch and a transposed
view, plus fp32 with tf32 products. Compiled variants are cached per session.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import NamedTuple

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("kernels are interpreted functions under TRITON_INTERPRET=1: nothing to compile",
                allow_module_level=True)

import fusedopt.kernels
import triton
from fusedopt.kernels import adam, lean, lion, multi_tensor, muon, newton_schulz, norm, sgd
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction, mangle_type

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Launch(NamedTuple):
    kernel: JITFunction
    args: tuple
    kwargs: dict


def record_launches(monkeypatch, call) -> list[Launch]:
    """The kernel launches that call() makes, recorded instead of run."""
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(JITFunction, "run", record)
        call()
    return launches


def argument_type(value):
    """Triton's type string of a kernel argument ("*fp32", "i32", "constexpr" for None, ...), a
    tuple of them for a tuple (element by element: Triton 3.3's mangle_type fails on tuples of
    tensors)."""
    if isinstance(value, tuple):
        return tuple(argument_type(v) for v in value)
    return mangle_type(value)


def ast_source(launch: Launch) -> tuple[ASTSource, dict]:
    """The ASTSource of a recorded launch (signature and constexprs as the JIT derives them from
    the arguments) and its compile options (the launch keywords that are not kernel arguments)."""
    fn = launch.kernel
    bound = dict(zip(fn.arg_names, launch.args))
    bound.update({k: v for k, v in launch.kwargs.items() if k in fn.arg_names})
    options = {k: v for k, v in launch.kwargs.items() if k not in fn.arg_names}
    signature, constexprs = {}, {}
    for param in fn.params:
        value = bound[param.name]
        kind = "constexpr" if param.is_constexpr else argument_type(value)
        signature[param.name] = kind
        if kind == "constexpr":  # a constexpr parameter, or a None argument
            constexprs[param.name] = value
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs), options


_COMPILED: dict[str, object] = {}


def compile_sm90(launch: Launch):
    """The launch's kernel compiled for sm_90 (once per distinct variant in this session)."""
    src, options = ast_source(launch)
    key = f"{src.hash()}-{sorted(options.items())}"
    if key not in _COMPILED:
        compiled = triton.compile(src, target=TARGET, options=options)
        assert compiled.asm["ptx"], f"{src.name}: no PTX"
        assert compiled.asm["cubin"], f"{src.name}: no cubin"
        _COMPILED[key] = compiled
    return _COMPILED[key]


def assert_launched_under_the_contraction_policy(launches: list[Launch]) -> None:
    assert launches, "the launcher launched nothing"
    for launch in launches:
        assert launch.kwargs.get("enable_fp_fusion") is False, (
            f"{launch.kernel.__name__} launched without enable_fp_fusion=False"
        )


# ---- optimizers ----------------------------------------------------------------------------

# Every switch of each launcher: its keyword and its (off, on) values; "grad_scale", "found_inf"
# and "lr_tensor" (COMMON_SWITCHES) are the inputs behind the constexprs launch() derives.
SWITCHES = {
    "adam": {"amsgrad": (False, True), "maximize": (False, True),
             "decoupled_weight_decay": (False, True)},
    "lion": {"maximize": (False, True)},
    "sgd": {"momentum": (0.0, 0.9), "nesterov": (False, True), "is_first_step": (False, True),
            "maximize": (False, True)},
}
COMMON_SWITCHES = ("grad_scale", "found_inf", "lr_tensor")
# Each switch alone, with what it needs (SGD's Nesterov and first step exist only with momentum).
SINGLE_SWITCHES = {
    "adam": [("amsgrad",), ("maximize",), ("decoupled_weight_decay",)],
    "lion": [("maximize",)],
    "sgd": [("momentum",), ("momentum", "nesterov"), ("momentum", "is_first_step"),
            ("maximize",)],
}
PATHS = ("tensor", "multi_aligned", "multi_unaligned")


class OptimizerCase(NamedTuple):
    algorithm: str
    path: str
    dtype: str
    switches: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.algorithm}-{self.path}-{self.dtype}-{'+'.join(self.switches) or 'plain'}"


def optimizer_cases() -> list[OptimizerCase]:
    cases = []
    for algorithm, switches in SWITCHES.items():
        everything = (*switches, *COMMON_SWITCHES)
        for path in PATHS:
            for dtype in DTYPES:
                cases.append(OptimizerCase(algorithm, path, dtype, everything))
        cases.append(OptimizerCase(algorithm, "tensor", "fp32", ()))
        cases.append(OptimizerCase(algorithm, "multi_aligned", "fp32", ()))
        for single in [*SINGLE_SWITCHES[algorithm], *((s,) for s in COMMON_SWITCHES)]:
            cases.append(OptimizerCase(algorithm, "multi_aligned", "fp32", single))
    return cases


def tensors(count: int, dtype: torch.dtype, aligned: bool) -> list[torch.Tensor]:
    """count 1-D tensors of 5 elements; unaligned ones start 1 element past an allocation."""
    if aligned:
        return [torch.ones(5, dtype=dtype) for _ in range(count)]
    return [torch.ones(6, dtype=dtype)[1:] for _ in range(count)]


def run_optimizer(case: OptimizerCase) -> None:
    """Calls case.algorithm's launcher with case's switches on, on two small CPU tensors."""
    dtype, aligned = DTYPES[case.dtype], case.path != "multi_unaligned"
    hyper = {name: values[name in case.switches]
             for name, values in SWITCHES[case.algorithm].items()}
    hyper.update(
        lr=torch.tensor(1e-3) if "lr_tensor" in case.switches else 1e-3,
        grad_scale=torch.tensor(2.0) if "grad_scale" in case.switches else None,
        found_inf=torch.tensor(0.0) if "found_inf" in case.switches else None,
        multi_tensor=case.path != "tensor",
    )
    if case.algorithm == "adam":
        lists = [tensors(2, dtype, aligned) for _ in range(4)]
        max_exp_avg_sqs = tensors(2, dtype, aligned) if hyper["amsgrad"] else []
        steps = [torch.zeros(1) for _ in range(2)]
        adam.adam(*lists, max_exp_avg_sqs, steps, beta1=0.9, beta2=0.999, weight_decay=0.01,
                  eps=1e-8, **hyper)
    elif case.algorithm == "lion":
        lists = [tensors(2, dtype, aligned) for _ in range(3)]
        lion.lion(*lists, beta1=0.9, beta2=0.99, weight_decay=0.01, **hyper)
    else:
        params, grads = tensors(2, dtype, aligned), tensors(2, dtype, aligned)
        buffers = tensors(2, dtype, aligned) if hyper["momentum"] else []
        sgd.sgd(params, grads, buffers, dampening=0.0, weight_decay=0.01, **hyper)


OPTIMIZER_CASES = optimizer_cases()


@pytest.mark.parametrize("case", OPTIMIZER_CASES, ids=[c.id for c in OPTIMIZER_CASES])
def test_optimizer_kernels_compile_for_sm90(case, monkeypatch):
    launches = record_launches(monkeypatch, lambda: run_optimizer(case))
    assert_launched_under_the_contraction_policy(launches)
    for launch in launches:
        if case.path == "tensor":
            assert launch.kernel is multi_tensor.tensor_kernel
        else:
            assert launch.kernel is multi_tensor.multi_tensor_kernel
            assert launch.kwargs["ALIGNED_16"] == (case.path == "multi_aligned")
        ptx = compile_sm90(launch).asm["ptx"]
        if case.path == "multi_aligned":
            assert "ld.global.v4" in ptx, "whole blocks of aligned tensors load 128 bits at a time"
        if case.path == "multi_unaligned":  # so the vector loads above are ALIGNED_16's doing
            assert "ld.global.v4" not in ptx
        # Adam too: its only FMAs are fma.rn.f64, inside libdevice's fp64 exp2 (bias corrections).
        assert "fma.rn.f32" not in ptx, "the update contracted a product into a sum"
        # Divisions are correctly rounded, as the reference's (Triton's `/` is div.full.f32).
        assert "div.full.f32" not in ptx and "div.approx" not in ptx


def test_the_fma_check_sees_contraction(monkeypatch):
    """The same Lion kernel compiled with fusion allowed does hold fma.rn.f32, so the check above
    would catch a launch that let the compiler contract."""
    case = OptimizerCase("lion", "multi_aligned", "fp32", ())
    (launch,) = record_launches(monkeypatch, lambda: run_optimizer(case))
    fused = launch._replace(kwargs={**launch.kwargs, "enable_fp_fusion": True})
    assert "fma.rn.f32" in compile_sm90(fused).asm["ptx"]
    assert "fma.rn.f32" not in compile_sm90(launch).asm["ptx"]


# ---- lean-state steps ----------------------------------------------------------------------

class LeanCase(NamedTuple):
    algorithm: str  # "adam", "lion", "sgd", "muon_momentum"
    param_dtype: str
    state_dtype: str  # a key of DTYPES, or "uint8" (8-bit blockwise)
    mode: str  # param_mode
    switches: tuple[str, ...]  # COMMON_SWITCHES, "maximize", SGD's "momentum", "nesterov",
    #                            "is_first_step", Muon's "nesterov"

    @property
    def id(self) -> str:
        return (f"{self.algorithm}_lean-{self.param_dtype}-{self.state_dtype}-{self.mode}-"
                f"{'+'.join(self.switches) or 'plain'}")


# Every param_mode with the state formats it is used with (tests/test_lean_states.py's MODES).
LEAN_MODES = [("fp32", "uint8", "nearest"), ("fp32", "bf16", "nearest"),
              ("bf16", "uint8", "master"), ("fp16", "fp32", "master"),
              ("bf16", "uint8", "compact"), ("bf16", "bf16", "kahan"), ("fp16", "fp16", "kahan"),
              ("bf16", "fp32", "stochastic"), ("bf16", "uint8", "nearest")]
ALL_LEAN_SWITCHES = (*COMMON_SWITCHES, "maximize")
LEAN_CASES = (
    [LeanCase("adam", *mode, ALL_LEAN_SWITCHES) for mode in LEAN_MODES]
    + [LeanCase("adam", "fp32", "uint8", "nearest", ())]
    + [LeanCase("lion", *mode, ALL_LEAN_SWITCHES) for mode in LEAN_MODES[:5:2]]
    + [LeanCase("sgd", "bf16", "uint8", "compact",
                (*ALL_LEAN_SWITCHES, "momentum", "nesterov")),
       LeanCase("sgd", "fp32", "uint8", "nearest", ("momentum", "is_first_step")),
       LeanCase("sgd", "bf16", "fp32", "stochastic", ALL_LEAN_SWITCHES)]
    + [LeanCase("muon_momentum", "fp32", "uint8", "output", ("nesterov",)),
       LeanCase("muon_momentum", "bf16", "fp32", "output", ())]
)


def run_lean(case: LeanCase, multi_tensor: bool = False) -> None:
    """Calls case.algorithm's lean launcher on two small CPU tensors (one partial 8-bit block
    each), one launch per tensor or (multi_tensor) one over an address table."""
    param_dtype = DTYPES[case.param_dtype]
    state_dtype = torch.uint8 if case.state_dtype == "uint8" else DTYPES[case.state_dtype]

    def state_lists():
        values = [torch.full((5,), 128 if state_dtype == torch.uint8 else 0, dtype=state_dtype)
                  for _ in range(2)]
        absmaxes = [torch.ones(1) for _ in range(2)] if state_dtype == torch.uint8 else []
        return values, absmaxes

    params, grads = tensors(2, param_dtype, True), tensors(2, param_dtype, True)
    extra_dtype = {"master": torch.float32, "compact": torch.int8, "kahan": param_dtype}
    extras = ([torch.zeros(5, dtype=extra_dtype[case.mode]) for _ in range(2)]
              if case.mode in extra_dtype else [])
    steps = [torch.zeros(()) for _ in range(2)]
    on = case.switches
    amp = dict(lr=torch.tensor(1e-3) if "lr_tensor" in on else 1e-3,
               grad_scale=torch.tensor(2.0) if "grad_scale" in on else None,
               found_inf=torch.tensor(0.0) if "found_inf" in on else None,
               maximize="maximize" in on, param_mode=case.mode, multi_tensor=multi_tensor)
    if case.algorithm == "adam":
        (m, m_absmax), (v, v_absmax) = state_lists(), state_lists()
        adam.adam_lean(params, grads, m, v, m_absmax, v_absmax, extras, steps, beta1=0.9,
                       beta2=0.999, weight_decay=0.01, eps=1e-8, decoupled_weight_decay=True,
                       **amp)
    elif case.algorithm == "lion":
        lion.lion_lean(params, grads, *state_lists(), extras, steps, beta1=0.9, beta2=0.99,
                       weight_decay=0.01, **amp)
    elif case.algorithm == "sgd":
        buffers = state_lists() if "momentum" in on else ([], [])
        sgd.sgd_lean(params, grads, *buffers, extras, steps, momentum=0.9 * ("momentum" in on),
                     dampening=0.0, weight_decay=0.01, nesterov="nesterov" in on,
                     is_first_step="is_first_step" in on, **amp)
    else:
        muon.muon_momentum_lean(params, grads, *state_lists(), momentum=0.95,
                                nesterov="nesterov" in on, multi_tensor=multi_tensor)


@pytest.mark.parametrize("multi", [False, True], ids=["tensor", "multi"])
@pytest.mark.parametrize("case", LEAN_CASES, ids=[c.id for c in LEAN_CASES])
def test_lean_kernels_compile_for_sm90(case, multi, monkeypatch):
    """Both lean kernels in each param_mode and state format: they compile, and hold no
    fma.rn.f32 (the contraction policy; Adam's fp64 bias corrections use fma.rn.f64) and no
    approximate division."""
    launches = record_launches(monkeypatch, lambda: run_lean(case, multi))
    assert_launched_under_the_contraction_policy(launches)
    for launch in launches:
        assert launch.kernel is (lean.lean_multi_tensor_kernel if multi
                                 else lean.lean_tensor_kernel)
        ptx = compile_sm90(launch).asm["ptx"]
        assert "fma.rn.f32" not in ptx
        assert "div.full.f32" not in ptx and "div.approx" not in ptx


# ---- norms ---------------------------------------------------------------------------------

class NormCase(NamedTuple):
    rms: bool
    dtype: str
    n: int  # row width: <= norm.MAX_BLOCK_N is one block, wider rows are looped over
    features: tuple[str, ...]  # of "residual", "weight", "bias", "zero_centered", "residual_fp32"

    @property
    def id(self) -> str:
        kind = "rms" if self.rms else "layernorm"
        return f"{kind}-{self.dtype}-n{self.n}-{'+'.join(self.features) or 'plain'}"


ALL_FEATURES = ("residual", "weight", "bias", "zero_centered")
NARROW, WIDE = 100, norm.MAX_BLOCK_N + 1


def norm_cases() -> list[NormCase]:
    cases = [NormCase(rms, dtype, n, ALL_FEATURES)
             for rms in (True, False) for dtype in DTYPES for n in (NARROW, WIDE)]
    cases += [NormCase(rms, "fp32", NARROW, ()) for rms in (True, False)]
    cases.append(NormCase(False, "fp32", norm.MAX_BLOCK_N, ("weight", "bias")))
    cases.append(NormCase(True, "bf16", NARROW, ("residual", "weight", "residual_fp32")))
    return cases


def run_norm(case: NormCase) -> None:
    """norm_fwd, then norm_bwd on its outputs (3 rows of case.n), with case's features."""
    dtype, n = DTYPES[case.dtype], case.n
    x = torch.randn(3, n).to(dtype)
    residual = torch.randn(3, n).to(dtype) if "residual" in case.features else None
    weight = torch.randn(n).to(dtype) if "weight" in case.features else None
    bias = torch.randn(n).to(dtype) if "bias" in case.features else None
    zero_centered = "zero_centered" in case.features
    _, residual_out, mean, rstd = norm.norm_fwd(x, residual, weight, bias, 1e-5, case.rms,
                                                zero_centered, "residual_fp32" in case.features)
    normalized = residual_out if residual is not None else x
    dresidual_out = torch.randn_like(normalized) if residual is not None else None
    norm.norm_bwd(torch.randn_like(normalized), dresidual_out, normalized, weight, bias, mean,
                  rstd, case.rms, zero_centered)


NORM_CASES = norm_cases()


@pytest.mark.parametrize("case", NORM_CASES, ids=[c.id for c in NORM_CASES])
def test_norm_kernels_compile_for_sm90(case, monkeypatch):
    launches = record_launches(monkeypatch, lambda: run_norm(case))
    assert_launched_under_the_contraction_policy(launches)
    for launch in launches:
        compile_sm90(launch)


# ---- Newton-Schulz products ---------------------------------------------------------------

class NewtonSchulzCase(NamedTuple):
    op: str  # "gram" or "gram_polynomial"
    dtype: str
    shape: str  # a key of NS_SHAPES
    input_precision: str | None = None

    @property
    def id(self) -> str:
        return f"{self.op}-{self.dtype}-{self.shape}" + (
            f"-{self.input_precision}" if self.input_precision else "")


# (batch or None, m, n, transposed): every row of newton_schulz.BLOCK_CONFIGS (m <= 32, <= 256,
# larger), sizes that are not multiples of the block, a batch, and a tall matrix's transposed
# view (x.mT of a contiguous (batch, n, m); for gram_polynomial, a.mT of a square a).
NS_SHAPES = {
    "small": (None, 5, 9, False),
    "odd": (None, 70, 33, False),
    "batched": (3, 64, 128, False),
    "tall": (2, 100, 300, True),
    "large": (None, 300, 257, False),
}
SHARED_MEMORY_SM90 = 227 * 1024  # the most shared memory one sm_90 block may use


def newton_schulz_cases() -> list[NewtonSchulzCase]:
    cases = [NewtonSchulzCase(op, dtype, shape) for op in ("gram", "gram_polynomial")
             for dtype in DTYPES for shape in NS_SHAPES]
    cases += [NewtonSchulzCase(op, "fp32", "odd", "tf32") for op in ("gram", "gram_polynomial")]
    return cases


def run_newton_schulz(case: NewtonSchulzCase) -> None:
    batch, m, n, transposed = NS_SHAPES[case.shape]
    k = n if case.op == "gram" else m
    stored = (k, m) if transposed else (m, k)
    x = torch.ones(stored if batch is None else (batch, *stored), dtype=DTYPES[case.dtype])
    if transposed:
        x = x.mT
    if case.op == "gram":
        newton_schulz.gram(x, input_precision=case.input_precision)
    else:
        newton_schulz.gram_polynomial(x, -4.775, 2.0315, input_precision=case.input_precision)


NS_CASES = newton_schulz_cases()


@pytest.mark.parametrize("case", NS_CASES, ids=[c.id for c in NS_CASES])
def test_newton_schulz_kernels_compile_for_sm90(case, monkeypatch):
    """Each compiles within sm_90's shared memory; fp16 / bf16 (and fp32 with tf32) products run
    on the tensor cores (wgmma, or mma.sync for the smallest tiles), and fp32 "ieee" ones do not.
    Where the tensor cores multiply, the PTX has no fma.rn.f32 at all: the epilogue
    alpha * acc + beta * c was not contracted (enable_fp_fusion=False)."""
    launches = record_launches(monkeypatch, lambda: run_newton_schulz(case))
    assert_launched_under_the_contraction_policy(launches)
    (launch,) = launches
    assert launch.kernel is newton_schulz._symmetric_matmul_kernel
    compiled = compile_sm90(launch)
    assert compiled.metadata.shared <= SHARED_MEMORY_SM90
    ptx = compiled.asm["ptx"]
    tensor_cores = "wgmma.mma_async" in ptx or "mma.sync" in ptx
    if case.dtype != "fp32" or case.input_precision == "tf32":
        assert tensor_cores, "tl.dot did not use the tensor cores"
        assert "fma.rn.f32" not in ptx, "the epilogue contracted a product into a sum"
    else:
        assert not tensor_cores, "fp32 products in ieee precision went to the tensor cores"
    if case.dtype == "bf16" and case.shape == "large":
        assert "wgmma.mma_async" in ptx, "128 x 128 bf16 tiles on sm_90 use wgmma"


# ---- coverage ------------------------------------------------------------------------------

def test_the_cases_launch_every_kernel(monkeypatch):
    """Every @triton.jit function named *_kernel in fusedopt.kernels is launched by some case
    above, so a new kernel (or a kernel no launcher reaches any more) cannot go unnoticed."""
    defined = set()
    for module_info in pkgutil.iter_modules(fusedopt.kernels.__path__):
        module = importlib.import_module(f"fusedopt.kernels.{module_info.name}")
        defined |= {obj for name, obj in vars(module).items()
                    if isinstance(obj, JITFunction) and name.endswith("_kernel")}
    launched = set()
    for case in OPTIMIZER_CASES:
        launched |= {launch.kernel for launch in
                     record_launches(monkeypatch, lambda case=case: run_optimizer(case))}
    for case in LEAN_CASES:
        for multi in (False, True):
            launched |= {launch.kernel for launch in record_launches(
                monkeypatch, lambda case=case, multi=multi: run_lean(case, multi))}
    for case in NORM_CASES:
        launched |= {launch.kernel for launch in
                     record_launches(monkeypatch, lambda case=case: run_norm(case))}
    for case in NS_CASES:
        launched |= {launch.kernel for launch in
                     record_launches(monkeypatch, lambda case=case: run_newton_schulz(case))}
    assert {k.__name__ for k in defined} == {k.__name__ for k in launched}
