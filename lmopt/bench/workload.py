"""The compare workload: a small decoder-only LLM of a real architecture (Llama), randomly initialised.

The model is transformers' ``LlamaForCausalLM`` built from a config -- RMSNorm, rotary position embeddings,
SwiGLU feed-forward blocks, no biases, untied input and output embeddings -- so every optimizer meets the
parameter roles of a real LLM (embeddings, norms, attention and MLP matrices, an output head). Sizes are
named:

======== ====== ====== ===== ============ =================================================================
name     hidden layers heads intermediate use
======== ====== ====== ===== ============ =================================================================
tiny     32     2      2     96           tests and smoke runs (~43K parameters with a byte vocabulary)
small    128    4      4     352          ``lmopt compare``'s default on CPU (~0.87M parameters)
base     256    4      4     688          ~3.3M parameters (~0.7 s per 16 x 256 step in fp32 on 2 CPU threads)
medium   512    8      8     1376         ~26M parameters (a GPU, or patience)
large    768    12     12    2048         ~85M parameters plus embeddings (GPU)
======== ====== ====== ===== ============ =================================================================

Parameter counts are with the 258-token byte vocabulary; a local tokenizer's vocabulary adds
``2 x vocab x hidden``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MODEL_SIZES", "ModelSize", "build_model", "count_parameters"]


@dataclass(frozen=True)
class ModelSize:
    """Shape of a Llama decoder (head dimension = hidden / heads)."""

    hidden: int
    layers: int
    heads: int
    intermediate: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


#: the named sizes ``--model`` accepts
MODEL_SIZES: dict[str, ModelSize] = {
    "tiny": ModelSize(hidden=32, layers=2, heads=2, intermediate=96),
    "small": ModelSize(hidden=128, layers=4, heads=4, intermediate=352),
    "base": ModelSize(hidden=256, layers=4, heads=4, intermediate=688),
    "medium": ModelSize(hidden=512, layers=8, heads=8, intermediate=1376),
    "large": ModelSize(hidden=768, layers=12, heads=12, intermediate=2048),
}


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ValueError(
            "lmopt compare needs transformers for its Llama workload: pip install 'lmopt[compare]'"
        ) from err
    return transformers


def build_model(
    size: str | ModelSize, *, vocab_size: int, seq_len: int, seed: int, device: torch.device | str = "cpu"
) -> nn.Module:
    """A randomly initialised ``LlamaForCausalLM`` of a named size, in fp32, the same for the same seed.

    Args:
        size: a name from :data:`MODEL_SIZES` or a :class:`ModelSize`.
        vocab_size: the tokenizer's vocabulary size (embedding and output rows).
        seq_len: the longest sequence the model will see (``max_position_embeddings``).
        seed: the initial weights depend only on this seed (``torch.manual_seed`` before construction).
        device: where the model is placed.

    Example:
        >>> model = build_model("tiny", vocab_size=258, seq_len=64, seed=0)
        >>> out = model(input_ids=ids, labels=ids)   # out.loss: next-token cross-entropy
    """
    if isinstance(size, str):
        if size not in MODEL_SIZES:
            raise ValueError(f"model must be one of {sorted(MODEL_SIZES)}, got {size!r}")
        size = MODEL_SIZES[size]
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an integer >= 2, got {vocab_size!r}")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2, got {seq_len!r}")
    transformers = _require_transformers()
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    # the weights depend on the seed only, not on what ran before in this process
    fork_devices = []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        model = transformers.LlamaForCausalLM(config)
    return model.to(device=device, dtype=torch.float32)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, each tensor once (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
