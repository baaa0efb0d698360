"""Planned versus measured memory of real training steps (transformers Llama / GPT-2, tiny configs, CPU).

    PYTHONPATH=$PWD python benchmarks/memory_plan_vs_measured.py \
        --out benchmarks/results/memory_plan_vs_measured.md

For each case: build the model (random weights), build the optimizer from the registry, measure one training
step with :func:`lmopt.memory.measure_training_step` (CPU: the allocator's own events under torch.profiler),
plan the same step with :func:`lmopt.memory.plan`, and print both as a Markdown table.
"""

from __future__ import annotations

import argparse
import platform

import torch
import transformers

import lmopt
from lmopt.memory import measure_training_step, plan


def build(arch: str, attention: str, dtype: torch.dtype, hidden: int = 128, layers: int = 3, vocab: int = 2048):
    torch.manual_seed(0)
    if arch == "llama":
        config = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=int(hidden * 8 / 3 // 16 * 16),
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation=attention,
        )
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation=attention,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype).train()


CASES = [
    ("llama", "sdpa", "adamw", torch.float32, 4, 256),
    ("llama", "eager", "adamw", torch.float32, 4, 256),
    ("llama", "sdpa", "adamw", torch.bfloat16, 4, 256),
    ("gpt2", "sdpa", "adamw", torch.float32, 4, 256),
    ("gpt2", "eager", "adamw", torch.float32, 4, 256),
    ("llama", "sdpa", "adamw", torch.float32, 1, 16),
    ("llama", "sdpa", "adamw_bf16", torch.float32, 1, 16),
    ("llama", "sdpa", "sgd_momentum", torch.float32, 1, 16),
    ("llama", "sdpa", "rmsprop", torch.float32, 1, 16),
    *[("llama", "sdpa", name, torch.float32, 1, 16) for name in ("adafactor", "came", "adam_mini", "lion")],
    *[("gpt2", "sdpa", name, torch.float32, 4, 256) for name in ("adafactor", "came", "adam_mini", "lion")],
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        "| model | attention | optimizer | dtype | batch | state planned = measured | params+grads+state "
        "| activations planned / measured | peak planned / measured (MB) | ratio | peak phase |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arch, attention, name, dtype, b, s in CASES:
        model = build(arch, attention, dtype)
        opt = lmopt.create_optimizer(name, model)
        x = torch.randint(0, model.config.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))
        m = measure_training_step(model, opt, lambda model=model, x=x: model(input_ids=x, labels=x).loss)
        p = plan(model, name, micro_batch=b, seq_len=s, device="cpu")
        static_p = p.parameters + p.gradients + p.optimizer_state
        static_m = m.parameters + m.gradients + m.optimizer_state
        rows.append(
            f"| {arch} | {attention} | {name} | {str(dtype)[6:]} | {b}x{s} | "
            f"{p.optimizer_state:,} {'=' if p.optimizer_state == m.optimizer_state else '!='} "
            f"{m.optimizer_state:,} | {static_p / static_m:.4f} | "
            f"{p.activations / 1e6:.2f} / {m.activations / 1e6:.2f} | "
            f"{p.peak / 1e6:.2f} / {m.peak / 1e6:.2f} | "
            f"{p.peak / m.peak:.3f} | {p.peak_phase} |"
        )
    text = "\n".join(
        [
            "# Planned versus measured training-step memory (CPU)",
            "",
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{platform.processor() or 'cpu'}, "
            "1 thread. Peak measured from the CPU allocator's events (torch.profiler profile_memory).",
            "Command: `PYTHONPATH=$PWD python benchmarks/memory_plan_vs_measured.py`",
            "",
            *rows,
        ]
    )
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
