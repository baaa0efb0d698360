"""docs/scaling.md's tables are the memory planner's numbers: each table in the page is rendered here from
``lmopt.memory.plan`` and must appear in the page verbatim (rerun ``python -m tests.test_scaling_doc`` to print
them after a planner change)."""

from __future__ import annotations

from pathlib import Path

from lmopt.memory import plan

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor", "came", "muon")
STAGES = (("zero1", "ZeRO-1"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3"))
STEP = {"micro_batch": 1, "seq_len": 4096, "activation_checkpointing": "full"}


def peak_table(model: str, devices=(8, 64, 512)) -> str:
    head = "| peak GB per GPU | " + " | ".join(f"{n} {label}" for n in devices for _, label in STAGES) + " |"
    lines = [head, "|---|" + "---:|" * (len(devices) * len(STAGES))]
    for name in OPTIMIZERS:
        cells = [
            f"{plan(model, name, devices=n, sharding=stage, **STEP).peak / 1e9:.1f}"
            for n in devices
            for stage, _ in STAGES
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def state_table(model: str, devices=(1, 8, 64, 512)) -> str:
    head = "| optimizer state GB per GPU | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in devices) + " |"
    lines = [head, "|---|" + "---:|" * len(devices)]
    for name in OPTIMIZERS:
        cells = [
            f"{plan(model, name, devices=n, sharding='zero1' if n > 1 else 'none', **STEP).optimizer_state / 1e9:.2f}"
            for n in devices
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hsdp_table(model: str, groups=(8, 16, 32, 64)) -> str:
    head = "| peak GB per GPU, HSDP shard group | " + " | ".join(f"{g} GPUs" for g in groups) + " |"
    lines = [head, "|---|" + "---:|" * len(groups)]
    for name in OPTIMIZERS:
        cells = [f"{plan(model, name, devices=g, sharding='fsdp', **STEP).peak / 1e9:.1f}" for g in groups]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tables() -> list[str]:
    return [
        peak_table("llama-2-7b"),
        state_table("llama-2-7b"),
        peak_table("llama-2-70b"),
        state_table("llama-2-70b"),
        hsdp_table("llama-2-70b"),
    ]


def test_scaling_doc_tables_are_the_planners():
    text = DOC.read_text()
    for table in tables():
        assert table in text, f"docs/scaling.md is out of date; its table should read:\n{table}"


if __name__ == "__main__":
    print("\n\n".join(tables()))
