"""Does low-bit state cost quality? fp32 AdamW vs lmopt AdamW8bit vs AdamW4bit on a small byte-level LM.

Corpus: the Python standard library's own sources, read as bytes (real text, present on every machine). Model: a
small GPT (byte vocabulary, pre-norm blocks, untied head), trained from the same initial weights on the same
batches (same token budget) with each optimizer; reported: validation loss on held-out bytes and the mean
training loss of the last 10% of steps. Writes benchmarks/results/lowbit_quality.md.

    python benchmarks/lowbit_quality.py                  # default: 400 steps, batch 16 x 128 bytes
    python benchmarks/lowbit_quality.py --steps 1000 --d-model 192
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import lmopt


def load_corpus(max_bytes: int) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyGPT(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        self.register_buffer("mask", torch.triu(torch.full((seq, seq), float("-inf")), 1), persistent=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos[: idx.shape[1]]
        mask = self.mask[: idx.shape[1], : idx.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def batches(data: torch.Tensor, steps: int, batch: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
        window = torch.stack([data[s : s + seq + 1] for s in starts.tolist()])
        yield window[:, :-1], window[:, 1:]


def train_and_evaluate(model, opt, args, train: torch.Tensor, val: torch.Tensor, data_seed: int):
    """``args.steps`` steps (warmup + cosine, clipping at 1.0) on ``train``, then the loss on ``args.eval_batches``
    validation batches: (training losses, validation losses, seconds of training)."""
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    losses = []
    start = time.perf_counter()
    for x, y in batches(train, args.steps, args.batch, args.seq, seed=data_seed):
        loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        val_losses = [
            F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item()
            for x, y in batches(val, args.eval_batches, args.batch, args.seq, seed=2)
        ]
    return losses, val_losses, elapsed


def run(name: str, make_opt, args, train: torch.Tensor, val: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = TinyGPT(args.d_model, args.layers, args.heads, args.seq)
    opt = make_opt(lmopt.param_groups(model, weight_decay=0.1))
    losses, val_losses, elapsed = train_and_evaluate(model, opt, args, train, val, data_seed=1)
    tail = losses[-max(1, args.steps // 10) :]
    summary = getattr(opt, "state_summary", lambda: "")()
    state_bytes = sum(t.nbytes for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{name}: val {sum(val_losses) / len(val_losses):.4f}, train tail {sum(tail) / len(tail):.4f}, "
        f"{elapsed:.0f} s; {summary}",
        flush=True,
    )
    return {
        "name": name,
        "val": sum(val_losses) / len(val_losses),
        "train": sum(tail) / len(tail),
        "seconds": elapsed,
        "state_bytes": state_bytes,
        "params": n_params,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--eval-batches", type=int, default=20)
    parser.add_argument("--corpus-bytes", type=int, default=4_000_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lowbit_quality.md"))
    args = parser.parse_args()
    data = load_corpus(args.corpus_bytes)
    split = int(data.numel() * 0.95)
    train, val = data[:split], data[split:]
    hyper = dict(lr=args.lr, betas=(0.9, 0.95))
    runs = [
        ("torch AdamW fp32 (fused)", lambda g: torch.optim.AdamW(g, fused=True, **hyper)),
        ("lmopt AdamW8bit", lambda g: lmopt.AdamW8bit(g, **hyper)),
        ("lmopt AdamW4bit", lambda g: lmopt.AdamW4bit(g, **hyper)),
    ]
    results = [run(name, make, args, train, val) for name, make in runs]
    base = results[0]
    lines = [
        "# Low-bit state quality: byte-level LM on the Python standard library",
        "",
        f"Command: `python benchmarks/lowbit_quality.py --steps {args.steps} --batch {args.batch} --seq {args.seq} "
        f"--d-model {args.d_model} --layers {args.layers}`; {results[0]['params']:,} parameters, "
        f"{args.steps * args.batch * args.seq:,} training tokens (bytes) per run, same initial weights and "
        f"batches; lr {args.lr} (warmup + cosine), betas (0.9, 0.95), weight decay 0.1 (matrices), clip 1.0; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| optimizer | val loss | vs fp32 | train loss (last 10%) | vs fp32 | state bytes | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['val']:.4f} | {100 * (r['val'] / base['val'] - 1):+.2f}% | {r['train']:.4f} | "
            f"{100 * (r['train'] / base['train'] - 1):+.2f}% | {r['state_bytes']:,} | {r['seconds']:.0f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
