"""The main job: a small GPT-style character-level language model, trained once per optimizer from
the same seed and the same data order, with what each optimizer costs and buys.

The model: token and position embeddings, pre-norm blocks (causal self-attention, a 4x GELU MLP),
fusedopt.RMSNorm with the residual add fused in (norm(update, stream) adds a sublayer's output to
the residual stream and normalizes the sum in one pass), and a linear head. The corpus: Python's
own pydoc_data/topics.py (the English text of its help topics), or --corpus FILE; the last 10% is
held out for validation.

The optimizers (--optimizers): torch.optim.AdamW (the baseline, torch's default implementation),
fusedopt.AdamW, fusedopt.Lion, fusedopt.Muon on the whole model (fusedopt.muon_param_groups: the
hidden matrices to Muon; the embeddings, head and norm weights to AdamW inside it), and the torch
way of doing Muon (torch.optim.Muon on those same matrices plus torch.optim.AdamW on the rest).

Each optimizer trains in a child process of its own, so that its peak memory is its own and no
run inherits another's allocator state. At the end: a table (losses, optimizer-step and whole-step
time, tokens/s, optimizer-state bytes, peak memory), a check that fusedopt.AdamW's loss curve
matches torch.optim.AdamW's, PNG plots, JSON and Markdown under bench/results/<machine>/.

    python bench/demo.py [--device cpu|cuda] [--steps 150] [--width 256] [--depth 3]
                         [--optimizers torch-adamw fusedopt-adamw ...] [--corpus FILE]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _report
import torch
import torch.nn.functional as F
from torch import nn

import fusedopt

# name -> label in tables and plots. The torch ones are the baselines.
OPTIMIZERS = {
    "torch-adamw": "torch AdamW",
    "fusedopt-adamw": "fusedopt AdamW",
    "fusedopt-lion": "fusedopt Lion",
    "fusedopt-muon": "fusedopt Muon",
    "torch-muon": "torch Muon + AdamW",
    # Lean states (fusedopt.optim._lean): fp32 params with 8-bit moments, then bf16 params kept
    # five ways (rounded to nearest as torch does, an fp32 master, a compact 24-bit master with
    # 8-bit moments, Kahan compensation, stochastic rounding).
    "fusedopt-adamw-8bit": "fusedopt AdamW 8-bit",
    "fusedopt-adamw-bf16": "fusedopt AdamW bf16",
    "fusedopt-adamw-bf16-master": "fusedopt AdamW bf16+master",
    "fusedopt-adamw-bf16-compact-8bit": "fusedopt AdamW bf16+compact 8-bit",
    "fusedopt-adamw-bf16-kahan": "fusedopt AdamW bf16 Kahan",
    "fusedopt-adamw-bf16-stochastic": "fusedopt AdamW bf16 stochastic",
}
# The lean modes' fusedopt.AdamW options, and which train bf16 params.
LEAN = {
    "fusedopt-adamw-8bit": dict(state_dtype=torch.uint8),
    "fusedopt-adamw-bf16": {},
    "fusedopt-adamw-bf16-master": dict(master_weights=True, state_dtype=torch.float32),
    "fusedopt-adamw-bf16-compact-8bit": dict(master_weights="compact", state_dtype=torch.uint8),
    "fusedopt-adamw-bf16-kahan": dict(kahan_summation=True),
    "fusedopt-adamw-bf16-stochastic": dict(stochastic_rounding=True),
}
BASELINES = ("torch-adamw", "torch-muon")
# Hyperparameters shared by every run. Lion takes a 3x smaller lr and a 3x larger weight decay
# (Chen et al. suggest 3-10x), so that lr * weight_decay stays AdamW's.
ADAMW = dict(lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
LION = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.3)
MUON = dict(lr=0.02, weight_decay=0.1)
# fusedopt.AdamW against torch.optim.AdamW: the largest |difference| of their per-step training
# losses (and of their final validation losses), in nats. The two differ by rounding only
# (docs/numerics.md); over the default 150 steps (2.4M params) it measured 4.7e-4, and a
# wrong formula (a bias correction, a decay applied twice) moves the curve by more than 0.01
# within tens of steps.
ADAMW_CURVE_TOLERANCE = 0.01


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attention_norm = fusedopt.RMSNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.attention_out = nn.Linear(width, width, bias=False)
        self.mlp_norm = fusedopt.RMSNorm(width)
        self.mlp_in = nn.Linear(width, 4 * width, bias=False)
        self.mlp_out = nn.Linear(4 * width, width, bias=False)

    def forward(self, stream: torch.Tensor, update: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream, update) -> (stream + update + attention, MLP output): each norm adds the
        previous sublayer's output to the stream in the same pass."""
        x, stream = add_and_norm(self.attention_norm, stream, update)
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        update = self.attention_out(attended.transpose(1, 2).reshape(batch, length, width))
        x, stream = add_and_norm(self.mlp_norm, stream, update)
        return stream, self.mlp_out(F.gelu(self.mlp_in(x)))


def add_and_norm(norm: nn.Module, stream: torch.Tensor, update: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(stream + update), stream + update), fused; the first block has no update yet."""
    return (norm(stream), stream) if update is None else norm(update, stream)


class GPT(nn.Module):
    def __init__(self, vocabulary: int, context: int, width: int, depth: int, heads: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocabulary, width)
        self.position_embedding = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = fusedopt.RMSNorm(width)
        self.head = nn.Linear(width, vocabulary, bias=False)  # the last nn.Linear: AdamW's

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        stream, update = self.token_embedding(tokens) + self.position_embedding(positions), None
        for block in self.blocks:
            stream, update = block(stream, update)
        x, _ = add_and_norm(self.norm, stream, update)
        return self.head(x)


def corpus_text(path: str | None) -> str:
    if path:
        return Path(path).read_text(encoding="utf-8")
    from pydoc_data import topics

    return "\n\n".join(topics.topics.values())


def make_optimizer(name: str, model: GPT) -> list[torch.optim.Optimizer]:
    """The optimizers that step the model together (two for the torch way of doing Muon)."""
    if name == "torch-adamw":
        return [torch.optim.AdamW(model.parameters(), **ADAMW)]
    if name == "fusedopt-adamw":
        return [fusedopt.AdamW(model.parameters(), **ADAMW)]
    if name == "fusedopt-lion":
        return [fusedopt.Lion(model.parameters(), **LION)]
    if name in LEAN:
        return [fusedopt.AdamW(model.parameters(), **ADAMW, **LEAN[name])]
    muon_group, adamw_group = fusedopt.muon_param_groups(
        model, adamw_lr=ADAMW["lr"], adamw_weight_decay=ADAMW["weight_decay"])
    if name == "fusedopt-muon":
        return [fusedopt.Muon([muon_group, {**adamw_group, "adamw_betas": ADAMW["betas"]}],
                              **MUON)]
    if name == "torch-muon":
        return [torch.optim.Muon(muon_group["params"], **MUON),
                torch.optim.AdamW(adamw_group["params"], **ADAMW)]
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def state_bytes(optimizers: list[torch.optim.Optimizer]) -> int:
    return sum(value.nbytes for opt in optimizers for state in opt.state.values()
               for value in state.values() if torch.is_tensor(value))


def train(name: str, args: argparse.Namespace) -> dict[str, object]:
    """One optimizer's run: per-step losses and times, validation losses, state and peak memory."""
    device = torch.device(args.device)
    text = corpus_text(args.corpus)
    alphabet = sorted(set(text))
    index = {c: i for i, c in enumerate(alphabet)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]

    torch.manual_seed(args.seed)
    model = GPT(len(alphabet), args.context, args.width, args.depth, args.heads).to(device)
    if "bf16" in name:  # the same initial values, rounded
        model = model.to(torch.bfloat16)
    optimizers = make_optimizer(name, model)
    batches = torch.Generator().manual_seed(args.seed)  # the same data order in every run

    def batch(source: torch.Tensor, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(source) - args.context - 1, (args.batch,), generator=generator)
        rows = torch.stack([source[s:s + args.context + 1] for s in starts.tolist()]).to(device)
        return rows[:, :-1], rows[:, 1:]

    val_generator = torch.Generator().manual_seed(args.seed + 1)
    val_batches = [batch(val_data, val_generator) for _ in range(args.val_batches)]

    def loss_of(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(tokens)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def validate() -> float:
        with torch.no_grad():
            return statistics.fmean(loss_of(*b).item() for b in val_batches)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, step_ms, optimizer_ms, elapsed, val = [], [], [], [], []
    val_every = max(1, args.steps // args.val_points)
    from tqdm import tqdm

    progress = tqdm(range(1, args.steps + 1), desc=f"{OPTIMIZERS[name]:>18}", unit="step",
                    file=sys.stderr, dynamic_ncols=True)
    training_seconds = 0.0
    for step in progress:
        tokens, targets = batch(train_data, batches)
        start = now()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss = loss_of(tokens, targets)
        loss.backward()
        backward_done = now()
        for opt in optimizers:
            opt.step()
        done = now()
        training_seconds += done - start
        losses.append(loss.item())
        step_ms.append((done - start) * 1e3)
        optimizer_ms.append((done - backward_done) * 1e3)
        elapsed.append(training_seconds)
        if step % val_every == 0 or step == args.steps:
            val.append((step, training_seconds, validate()))
        progress.set_postfix(loss=f"{losses[-1]:.3f}", step_ms=f"{step_ms[-1]:.0f}",
                             opt_ms=f"{optimizer_ms[-1]:.1f}")
    progress.close()
    timed = slice(min(5, args.steps - 1), None)  # the first steps allocate state and warm caches
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "optimizer": name,
        "params": sum(p.numel() for p in model.parameters()),
        "train_loss": losses,
        "elapsed_s": elapsed,
        "val_loss": val,
        "final_train_loss": statistics.fmean(losses[-10:]),
        "final_val_loss": val[-1][2],
        "step_ms": statistics.median(step_ms[timed]),
        "optimizer_step_ms": statistics.median(optimizer_ms[timed]),
        "forward_backward_ms": statistics.median(
            [whole - opt for whole, opt in zip(step_ms[timed], optimizer_ms[timed])]),
        "tokens_per_s": args.batch * args.context / (statistics.median(step_ms[timed]) / 1e3),
        "state_bytes": state_bytes(optimizers),
        "peak_memory_bytes": peak,
        "peak_memory_kind": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                             "the process's peak resident set (ru_maxrss), torch included"),
    }


def adamw_curve_check(runs: dict[str, dict]) -> dict[str, object] | None:
    """fusedopt.AdamW's training losses against torch.optim.AdamW's, step by step."""
    if "torch-adamw" not in runs or "fusedopt-adamw" not in runs:
        return None
    ours, theirs = runs["fusedopt-adamw"]["train_loss"], runs["torch-adamw"]["train_loss"]
    difference = max(abs(a - b) for a, b in zip(ours, theirs))
    val_difference = abs(runs["fusedopt-adamw"]["final_val_loss"]
                         - runs["torch-adamw"]["final_val_loss"])
    return {"max_abs_train_loss_difference": difference,
            "final_val_loss_difference": val_difference,
            "tolerance": ADAMW_CURVE_TOLERANCE,
            "agree": max(difference, val_difference) <= ADAMW_CURVE_TOLERANCE}


def markdown(report: dict[str, object]) -> str:
    config = report["config"]
    lines = _report.header(report["machine"]) + [
        f"Model: {report['params']:,} params ({config['depth']} blocks, width {config['width']}, "
        f"{config['heads']} heads, context {config['context']}), batch {config['batch']}, "
        f"{config['steps']} steps on {report['corpus']} ({report['corpus_chars']:,} characters, "
        f"{report['vocabulary']} distinct); device {config['device']}. Times are medians over "
        "the steps after the fifth; the final train loss is the mean of the last 10 steps. The "
        "runs follow one another, so the forward+backward column (the same model in every run) "
        "shows how much the machine drifted between them.", "",
        "| optimizer | final train loss | final val loss | optimizer step ms | forward+backward ms "
        "| whole step ms | tokens/s | optimizer state MB | peak memory MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in report["runs"].values():
        lines.append(
            f"| {OPTIMIZERS[run['optimizer']]} | {run['final_train_loss']:.3f} | "
            f"{run['final_val_loss']:.3f} | {run['optimizer_step_ms']:.2f} | "
            f"{run['forward_backward_ms']:.1f} | {run['step_ms']:.1f} | "
            f"{run['tokens_per_s']:,.0f} | {run['state_bytes'] / 2**20:.1f} | "
            f"{run['peak_memory_bytes'] / 2**20:.0f} |")
    first = next(iter(report["runs"].values()))
    lines += ["", f"Peak memory: {first['peak_memory_kind']}."]
    check = report["adamw_check"]
    if check:
        lines += ["", check_sentence(check)]
    return "\n".join(lines)


def check_sentence(check: dict[str, object]) -> str:
    verdict = "matches" if check["agree"] else "DOES NOT match"
    return (f"fusedopt.AdamW {verdict} torch.optim.AdamW: the per-step training losses differ "
            f"by at most {check['max_abs_train_loss_difference']:.2e} and the final validation "
            f"losses by {check['final_val_loss_difference']:.2e} "
            f"(tolerance {check['tolerance']} nats).")


def plot(report: dict[str, object], directory: Path) -> list[Path]:
    """Loss against step and against time; optimizer-step time; optimizer-state memory."""
    plt = _report.pyplot()
    runs = report["runs"]
    # A colour per run, none of them grey (the bar charts' colour for the torch baselines).
    palette = [f"C{i}" for i in range(10) if i != 7] + [plt.cm.tab20(i) for i in range(1, 20, 2)]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(OPTIMIZERS)}
    paths = []
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, run in runs.items():
        smooth = moving_average(run["train_loss"], 10)
        # The torch baselines wide and pale, so that a fusedopt line drawn on top stays visible.
        style = dict(linewidth=4, alpha=0.45) if name in BASELINES else dict(linewidth=1.5)
        steps = range(1, len(smooth) + 1)
        for axis, x, val_x in ((axes[0], steps, [v[0] for v in run["val_loss"]]),
                               (axes[1], run["elapsed_s"], [v[1] for v in run["val_loss"]])):
            axis.plot(x, smooth, color=colors[name], label=OPTIMIZERS[name], **style)
            axis.plot(val_x, [v[2] for v in run["val_loss"]], "o", color=colors[name],
                      markersize=5)
    axes[0].plot([], [], "k-", label="train (mean of the last 10 steps)")
    axes[0].plot([], [], "ko", label="validation")
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training time, validation excluded (s)")
    axes[0].set_ylabel("cross-entropy loss (nats/char)")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Character-level GPT, {report['params'] / 1e6:.1f}M params: loss "
                    f"({report['machine']['device']})", fontsize=10)
    figure.tight_layout()
    paths.append(_report.save(figure, directory / "demo-loss.png"))

    for key, scale, xlabel, stem in (
            ("optimizer_step_ms", 1, "optimizer step (ms, median)", "demo-optimizer-step"),
            ("state_bytes", 2**-20, "optimizer state (MB)", "demo-state-memory")):
        figure, axis = plt.subplots(figsize=(8, 0.5 * len(runs) + 1.5))
        names = list(runs)[::-1]
        values = [runs[n][key] * scale for n in names]
        bars = axis.barh([OPTIMIZERS[n] for n in names], values,
                         color=["0.6" if n in BASELINES else colors[n] for n in names])
        axis.bar_label(bars, fmt="%.2f" if key == "optimizer_step_ms" else "%.1f", padding=3)
        axis.set_xlabel(xlabel)
        axis.set_xlim(0, max(values) * 1.2)
        axis.set_title(f"{report['params'] / 1e6:.1f}M-param GPT; torch baselines in grey",
                       fontsize=10)
        figure.tight_layout()
        paths.append(_report.save(figure, directory / f"{stem}.png"))
    return paths


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS),
                        choices=list(OPTIMIZERS))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--corpus", default=None,
                        help="a UTF-8 text file (default: Python's pydoc_data/topics.py text)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-points", type=int, default=8, help="validations per run")
    parser.add_argument("--val-batches", type=int, default=4)
    parser.add_argument("--out", default=None,
                        help="results directory (default: bench/results/<machine>/)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.width % args.heads:
        parser.error(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    if args.worker:  # a child: one optimizer's run, its result as JSON on the named file
        name, result_path = args.worker.split(":", 1)
        Path(result_path).write_text(json.dumps(train(name, args)))
        return

    if "torch-muon" in args.optimizers and not hasattr(torch.optim, "Muon"):
        print(f"torch {torch.__version__} has no torch.optim.Muon: {OPTIMIZERS['torch-muon']} "
              "is not run", file=sys.stderr)
        args.optimizers.remove("torch-muon")
    started = time.perf_counter()
    runs = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.optimizers:
            result_path = Path(scratch) / f"{name}.json"
            child = [sys.executable, __file__, *sys.argv[1:], "--worker", f"{name}:{result_path}"]
            subprocess.run(child, check=True)
            runs[name] = json.loads(result_path.read_text())
    text = corpus_text(args.corpus)
    report = {
        "machine": _report.machine(args.device),
        "config": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
        "corpus": args.corpus or "pydoc_data/topics.py",
        "corpus_chars": len(text),
        "vocabulary": len(set(text)),
        "params": next(iter(runs.values()))["params"],
        "hyperparameters": {"adamw": ADAMW, "lion": LION, "muon": MUON},
        "runs": runs,
        "adamw_check": adamw_curve_check(runs),
        "wall_s": time.perf_counter() - started,
    }
    directory = Path(args.out) if args.out else _report.results_dir(args.device)
    directory.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (directory / "demo.json").write_text(json.dumps(report, indent=1) + "\n")
    (directory / "demo.md").write_text(table + "\n")
    paths = plot(report, directory)
    print("\n" + table)
    print(f"\nwrote {directory / 'demo.json'}, demo.md and " + ", ".join(p.name for p in paths))
    print(f"{len(runs)} runs in {report['wall_s']:.0f} s")
    if report["adamw_check"] and not report["adamw_check"]["agree"]:
        sys.exit("fusedopt.AdamW's loss curve does not match torch.optim.AdamW's: a bug")


if __name__ == "__main__":
    main()
