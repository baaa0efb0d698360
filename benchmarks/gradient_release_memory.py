"""Peak memory of a training step with and without gradient release, on a small transformer LM on CPU.

Each configuration runs in a fresh process. glibc is told to serve every allocation above 64 KiB with mmap
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and the resident set follows the
live tensors. The process builds the model and optimizer, runs two warm-up steps (optimizer state created),
then
resets the kernel's peak-RSS counter (``/proc/self/clear_refs``) and measures one training step: forward,
backward, update. Reported: peak RSS during the step minus RSS before it (the step's transient memory:
activations, gradients, temporaries), and the analytic gradient bytes (4 per fp32 parameter).

    python benchmarks/gradient_release_memory.py                # writes
    benchmarks/results/gradient_release_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def run_case(optimizer: str, release: bool, args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    import lmopt
    from lmopt.optim.release import GradientRelease

    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x, mask):
            h = self.norm1(x)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.norm2(x))

    class TinyLM(nn.Module):
        def __init__(self, vocab: int, d: int, layers: int, heads: int, context: int):
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Embedding(context, d)
            self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
            self.norm = nn.LayerNorm(d)
            self.lm_head = nn.Linear(d, vocab, bias=False)

        def forward(self, tokens):
            t = tokens.shape[1]
            mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
            x = self.embed(tokens) + self.pos(torch.arange(t))
            for block in self.blocks:
                x = block(x, mask)
            return self.lm_head(self.norm(x))

    model = TinyLM(args.vocab, args.d_model, args.layers, args.heads, args.context)
    n_params = sum(p.numel() for p in model.parameters())
    opt = lmopt.create_optimizer(optimizer, model, lr=1e-4)
    rel = GradientRelease(opt) if release else None
    gen = torch.Generator().manual_seed(1)

    def train_step():
        tokens = torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=gen)
        logits = model(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, args.vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        if rel is None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            rel.step()
        return float(loss)

    for _ in range(2):
        train_step()
    state_bytes = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    t0 = time.perf_counter()
    train_step()
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return {
        "optimizer": optimizer,
        "release": release,
        "n_params": n_params,
        "state_bytes": state_bytes,
        "rss_before_mib": before / 1024,
        "peak_mib": peak / 1024,
        "step_peak_mib": (peak - before) / 1024,
        "grad_mib": n_params * 4 / 2**20,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", default="adamw,adabound,muon")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gradient_release_memory.md"))
    parser.add_argument("--run-case", nargs=2, metavar=("OPTIMIZER", "RELEASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_case:
        print(json.dumps(run_case(args.run_case[0], args.run_case[1] == "1", args)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    passthrough = [
        "--vocab",
        str(args.vocab),
        "--d-model",
        str(args.d_model),
        "--layers",
        str(args.layers),
        "--heads",
        str(args.heads),
        "--context",
        str(args.context),
        "--batch",
        str(args.batch),
    ]
    rows = []
    for name in args.optimizers.split(","):
        for release in (False, True):
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--run-case", name, str(int(release))],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)

    import torch

    lines = [
        "# Gradient release: peak memory of one training step (CPU)",
        "",
        f"Command: `python benchmarks/gradient_release_memory.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. Model: a causal transformer LM, vocab {args.vocab}, d_model "
        f"{args.d_model}, {args.layers} layers, context {args.context}, batch {args.batch}, fp32; "
        f"{rows[0]['n_params'] / 1e6:.1f}M parameters ({rows[0]['grad_mib']:.0f} MiB of fp32 gradients).",
        "",
        "`step peak` = peak RSS during one step (forward, backward, update) minus RSS before it: "
        "activations, "
        "gradients and temporaries. Each row is a fresh process with `MALLOC_MMAP_THRESHOLD_=65536` so "
        "freed tensors "
        "leave the resident set.",
        "",
        "| optimizer | gradient release | step peak MiB | saved MiB | fp32 gradients MiB | state MiB | step s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for i in range(0, len(rows), 2):
        base, rel = rows[i], rows[i + 1]
        for r in (base, rel):
            saved = base["step_peak_mib"] - r["step_peak_mib"]
            lines.append(
                f"| {r['optimizer']} | {'yes' if r['release'] else 'no'} | {r['step_peak_mib']:.1f} | "
                f"{saved:.1f} | {r['grad_mib']:.1f} | {r['state_bytes'] / 2**20:.1f} | {r['seconds']:.2f} |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
