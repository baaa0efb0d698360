"""Model shapes for memory planning: every parameter tensor's shape, plus what activations depend on.

The planner needs the per-tensor shapes, not only a parameter count: factored optimizers (Adafactor, CAME)
keep ``rows + cols`` statistics per matrix, quantized optimizers keep one scale per block of a tensor and
full-precision state for small tensors, so state bytes are only exact when computed tensor by tensor.

A :class:`ModelShape` comes from

* a name (:func:`model_shape`): GPT-2 small/medium/large/XL, LLaMA-1/2 7B/13B/70B (LLaMA-1 65B), Llama-3
  8B/70B, Mistral 7B, T5-3B/11B, and ``"NB"`` (e.g. ``"7B"``, ``"1.5B"``) for a generic LLaMA-style decoder
  of N billion parameters. The tensors are generated in pure Python with the names and shapes transformers
  gives them (tests check this against transformers' models built on the meta device);
* a transformers config (``LlamaConfig``, ``GPT2Config``, ...): the model is built on the meta device (no
  memory) and read like a module;
* an ``nn.Module``: its parameters, roles from :func:`lmopt.classify_parameters`, and architecture from
  ``model.config`` when it has one.

Published configurations: GPT-2 (Radford et al. 2019), LLaMA (Touvron et al. 2023a), Llama 2 (Touvron et al.
2023b), Llama 3 (Grattafiori et al. 2024), Mistral 7B (Jiang et al. 2023), T5 (Raffel et al. 2020), as
distributed in their Hugging Face ``config.json`` files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "Architecture",
    "ModelShape",
    "ParamShape",
    "generic_decoder",
    "model_shape",
    "named_shapes",
]


@dataclass(frozen=True)
class ParamShape:
    """One parameter tensor: qualified name, shape, role (as :func:`lmopt.classify_parameters`) and dtype.

    ``dtype`` is None for planned shapes (the precision mode decides) and the tensor's dtype for a module.
    """

    name: str
    shape: tuple[int, ...]
    role: str
    dtype: torch.dtype | None = None
    trainable: bool = True

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        """The owning module's own name (``q_proj`` for ``model.layers.0.self_attn.q_proj.weight``)."""
        parts = self.name.split(".")
        return parts[-2] if len(parts) >= 2 else ""


@dataclass(frozen=True)
class Architecture:
    """What activation memory depends on.

    Attributes:
        family: ``"llama"`` (RMSNorm, rotary, gated SiLU MLP: LLaMA, Llama 3, Mistral), ``"gpt2"`` (LayerNorm,
            learned positions, GeLU MLP), ``"t5"`` (encoder-decoder, RMSNorm, ReLU MLP) or ``"decoder"``.
        num_layers: transformer blocks (the decoder's for encoder-decoders; see ``encoder_layers``).
        hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size, vocab_size: the usual.
        gated_mlp: the MLP has a gate (SwiGLU / GeGLU: three matrices).
        dropout: dropout is active in training (masks are stored).
        max_seq_len: the context length the model was trained with (the default sequence length).
        encoder_layers: encoder blocks of an encoder-decoder (0 for decoder-only).
        implementation: ``"transformers"`` when the activations are those of transformers' modules.
        attention: ``"sdpa"``/``"flash_attention_2"`` (no s^2 scores kept) or ``"eager"``; None when unknown.
    """

    family: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool
    dropout: bool = False
    max_seq_len: int = 2048
    encoder_layers: int = 0
    implementation: str = "reference"
    attention: str | None = None

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_size(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class ModelShape:
    """A model as the planner sees it: its parameter tensors and (when known) its architecture."""

    name: str
    params: tuple[ParamShape, ...]
    architecture: Architecture | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel for p in self.params if p.trainable)

    def layers(self) -> dict[str, list[ParamShape]]:
        """Parameters grouped by transformer block (``...layers.3.``/``...h.3.``/``...block.3.``), the rest
        under ``""`` -- the unit FSDP wraps and ZeRO-3 gathers."""
        cached = self.__dict__.get("_layers")
        if cached is not None:
            return cached
        out: dict[str, list[ParamShape]] = {}
        for p in self.params:
            m = re.search(r"^(.*?\.(?:layers|h|block|blocks)\.\d+)\.", p.name)
            out.setdefault(m.group(1) if m else "", []).append(p)
        object.__setattr__(self, "_layers", out)  # frozen dataclass: a private memo
        return out


# ----------------------------------------------------------------------------------------------------
# generators, with transformers' parameter names
def _llama(
    name: str,
    *,
    layers: int,
    hidden: int,
    heads: int,
    ffn: int,
    vocab: int,
    context: int,
    kv_heads: int | None = None,
    tied: bool = False,
    family: str = "llama",
) -> ModelShape:
    kv_heads = heads if kv_heads is None else kv_heads  # multi-head attention unless given
    hd = hidden // heads
    params = [ParamShape("model.embed_tokens.weight", (vocab, hidden), "embedding")]
    for i in range(layers):
        p = f"model.layers.{i}."
        params += [
            ParamShape(p + "self_attn.q_proj.weight", (heads * hd, hidden), "matrix"),
            ParamShape(p + "self_attn.k_proj.weight", (kv_heads * hd, hidden), "matrix"),
            ParamShape(p + "self_attn.v_proj.weight", (kv_heads * hd, hidden), "matrix"),
            ParamShape(p + "self_attn.o_proj.weight", (hidden, heads * hd), "matrix"),
            ParamShape(p + "mlp.gate_proj.weight", (ffn, hidden), "matrix"),
            ParamShape(p + "mlp.up_proj.weight", (ffn, hidden), "matrix"),
            ParamShape(p + "mlp.down_proj.weight", (hidden, ffn), "matrix"),
            ParamShape(p + "input_layernorm.weight", (hidden,), "norm"),
            ParamShape(p + "post_attention_layernorm.weight", (hidden,), "norm"),
        ]
    params.append(ParamShape("model.norm.weight", (hidden,), "norm"))
    if not tied:
        params.append(ParamShape("lm_head.weight", (vocab, hidden), "head"))
    arch = Architecture(family, layers, hidden, heads, kv_heads, hd, ffn, vocab, gated_mlp=True, max_seq_len=context)
    return ModelShape(name, tuple(params), arch)


def _gpt2(name: str, *, layers: int, hidden: int, heads: int, vocab: int = 50257, context: int = 1024) -> ModelShape:
    # transformers' GPT-2 uses Conv1D: weights are stored (in, out); the LM head is tied to wte
    params = [
        ParamShape("transformer.wte.weight", (vocab, hidden), "embedding"),
        ParamShape("transformer.wpe.weight", (context, hidden), "embedding"),
    ]
    for i in range(layers):
        p = f"transformer.h.{i}."
        params += [
            ParamShape(p + "ln_1.weight", (hidden,), "norm"),
            ParamShape(p + "ln_1.bias", (hidden,), "norm"),
            ParamShape(p + "attn.c_attn.weight", (hidden, 3 * hidden), "matrix"),
            ParamShape(p + "attn.c_attn.bias", (3 * hidden,), "bias"),
            ParamShape(p + "attn.c_proj.weight", (hidden, hidden), "matrix"),
            ParamShape(p + "attn.c_proj.bias", (hidden,), "bias"),
            ParamShape(p + "ln_2.weight", (hidden,), "norm"),
            ParamShape(p + "ln_2.bias", (hidden,), "norm"),
            ParamShape(p + "mlp.c_fc.weight", (hidden, 4 * hidden), "matrix"),
            ParamShape(p + "mlp.c_fc.bias", (4 * hidden,), "bias"),
            ParamShape(p + "mlp.c_proj.weight", (4 * hidden, hidden), "matrix"),
            ParamShape(p + "mlp.c_proj.bias", (hidden,), "bias"),
        ]
    params += [
        ParamShape("transformer.ln_f.weight", (hidden,), "norm"),
        ParamShape("transformer.ln_f.bias", (hidden,), "norm"),
    ]
    arch = Architecture(
        "gpt2",
        layers,
        hidden,
        heads,
        heads,
        hidden // heads,
        4 * hidden,
        vocab,
        gated_mlp=False,
        dropout=True,
        max_seq_len=context,
    )
    return ModelShape(name, tuple(params), arch)


def _t5(
    name: str,
    *,
    layers: int,
    d_model: int,
    d_ff: int,
    d_kv: int,
    heads: int,
    vocab: int = 32128,
    buckets: int = 32,
) -> ModelShape:
    # T5 v1.0: shared embedding tied to the LM head, ReLU MLP, RMS layer norms without bias,
    # relative position bias in the first block of each stack
    inner = heads * d_kv
    params = [ParamShape("shared.weight", (vocab, d_model), "embedding")]
    for stack in ("encoder", "decoder"):
        for i in range(layers):
            p = f"{stack}.block.{i}.layer."
            attn = ["SelfAttention"] + (["EncDecAttention"] if stack == "decoder" else [])
            for j, kind in enumerate(attn):
                params += [ParamShape(f"{p}{j}.{kind}.{w}.weight", (inner, d_model), "matrix") for w in "qkv"]
                params.append(ParamShape(f"{p}{j}.{kind}.o.weight", (d_model, inner), "matrix"))
                if kind == "SelfAttention" and i == 0:
                    params.append(
                        ParamShape(f"{p}{j}.{kind}.relative_attention_bias.weight", (buckets, heads), "embedding")
                    )
                params.append(ParamShape(f"{p}{j}.layer_norm.weight", (d_model,), "norm"))
            j = len(attn)
            params += [
                ParamShape(f"{p}{j}.DenseReluDense.wi.weight", (d_ff, d_model), "matrix"),
                ParamShape(f"{p}{j}.DenseReluDense.wo.weight", (d_model, d_ff), "matrix"),
                ParamShape(f"{p}{j}.layer_norm.weight", (d_model,), "norm"),
            ]
        params.append(ParamShape(f"{stack}.final_layer_norm.weight", (d_model,), "norm"))
    arch = Architecture(
        "t5",
        layers,
        d_model,
        heads,
        heads,
        d_kv,
        d_ff,
        vocab,
        gated_mlp=False,
        dropout=True,
        max_seq_len=512,
        encoder_layers=layers,
    )
    return ModelShape(name, tuple(params), arch)


def generic_decoder(billions: float) -> ModelShape:
    """A LLaMA-style decoder with ``billions`` x 1e9 parameters (to within 2 x hidden parameters).

    Shape rule (stated so results can be reproduced): hidden size ``d = (128 N / 12)^(1/3)`` rounded to a
    multiple of 256 (so ``12 L d^2 ~ N`` at LLaMA's aspect ratio ``d / L = 128``), ``L = d / 128`` blocks
    (fewer if the blocks alone would exceed 95% of N), ``d / 128`` heads of 128, SwiGLU width ``8d/3``
    rounded up to a multiple of 256, untied head; the vocabulary takes up the rest, so the total is exactly N
    x 1e9 up to one vocabulary row pair. Published tables (e.g. "7B needs 112 GB with mixed-precision Adam")
    assume N x 1e9 parameters, which is what this shape reproduces.
    """
    if not isinstance(billions, (int, float)) or isinstance(billions, bool) or not 0.01 <= billions <= 2000:
        raise ValueError(f"billions must be a number in [0.01, 2000], got {billions!r}")
    target = billions * 1e9
    hidden = max(256, 256 * round((128 * target / 12) ** (1 / 3) / 256))
    ffn = 256 * math.ceil(8 * hidden / 3 / 256)
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round(hidden / 128))
    while layers > 1 and layers * per_layer > 0.95 * target:
        layers -= 1
    vocab = max(256, round((target - layers * per_layer - hidden) / (2 * hidden)))
    label = f"{billions:g}B"
    shape = _llama(
        label,
        layers=layers,
        hidden=hidden,
        heads=hidden // 128,
        kv_heads=hidden // 128,
        ffn=ffn,
        vocab=vocab,
        context=4096,
    )
    return replace(
        shape,
        notes=(
            f"generic {label} decoder: {layers} layers, hidden {hidden}, SwiGLU {ffn}, "
            f"vocab {vocab} (sized to {shape.num_parameters:,} parameters)",
        ),
    )


# what every size of a family shares (their config.json files); grouped-query attention where kv_heads is given
_LLAMA1: dict[str, Any] = {"vocab": 32000, "context": 2048}
_LLAMA2: dict[str, Any] = {"vocab": 32000, "context": 4096}
_LLAMA3: dict[str, Any] = {"kv_heads": 8, "vocab": 128256, "context": 8192}

_NAMED: dict[str, Any] = {
    "gpt2-small": lambda: _gpt2("gpt2-small", layers=12, hidden=768, heads=12),
    "gpt2-medium": lambda: _gpt2("gpt2-medium", layers=24, hidden=1024, heads=16),
    "gpt2-large": lambda: _gpt2("gpt2-large", layers=36, hidden=1280, heads=20),
    "gpt2-xl": lambda: _gpt2("gpt2-xl", layers=48, hidden=1600, heads=25),
    "llama-7b": lambda: _llama("llama-7b", layers=32, hidden=4096, heads=32, ffn=11008, **_LLAMA1),
    "llama-13b": lambda: _llama("llama-13b", layers=40, hidden=5120, heads=40, ffn=13824, **_LLAMA1),
    "llama-65b": lambda: _llama("llama-65b", layers=80, hidden=8192, heads=64, ffn=22016, **_LLAMA1),
    "llama-2-7b": lambda: _llama("llama-2-7b", layers=32, hidden=4096, heads=32, ffn=11008, **_LLAMA2),
    "llama-2-13b": lambda: _llama("llama-2-13b", layers=40, hidden=5120, heads=40, ffn=13824, **_LLAMA2),
    "llama-2-70b": lambda: _llama("llama-2-70b", layers=80, hidden=8192, heads=64, kv_heads=8, ffn=28672, **_LLAMA2),
    "llama-3-8b": lambda: _llama("llama-3-8b", layers=32, hidden=4096, heads=32, ffn=14336, **_LLAMA3),
    "llama-3-70b": lambda: _llama("llama-3-70b", layers=80, hidden=8192, heads=64, ffn=28672, **_LLAMA3),
    "mistral-7b": lambda: _llama(
        "mistral-7b",
        layers=32,
        hidden=4096,
        heads=32,
        kv_heads=8,
        ffn=14336,
        vocab=32000,
        context=32768,
        family="llama",
    ),
    "t5-3b": lambda: _t5("t5-3b", layers=24, d_model=1024, d_ff=16384, d_kv=128, heads=32),
    "t5-11b": lambda: _t5("t5-11b", layers=24, d_model=1024, d_ff=65536, d_kv=128, heads=128),
}


def named_shapes() -> list[str]:
    """The names :func:`model_shape` knows (besides ``"NB"``)."""
    return list(_NAMED)


def _canonical(name: str) -> str:
    key = name.strip().lower().replace("_", "-").replace(" ", "-").removeprefix("meta-")
    key = key.split("/")[-1]  # "meta-llama/Llama-2-7b-hf" -> "llama-2-7b-hf"
    key = re.sub(r"-hf$", "", key)
    m = re.fullmatch(r"llama-?(?:(\d(?:\.\d)?)-)?(\d+b)", key)
    if m:
        version = m.group(1)
        version = {"1": None, "3.1": "3"}.get(version, version)
        return f"llama-{version}-{m.group(2)}" if version else f"llama-{m.group(2)}"
    m = re.fullmatch(r"mistral-?7b(?:-v0\.\d)?", key)
    if m:
        return "mistral-7b"
    m = re.fullmatch(r"t5-?(3b|11b)", key)
    if m:
        return f"t5-{m.group(1)}"
    m = re.fullmatch(r"gpt-?2(?:-?(small|medium|large|xl))?", key)
    if m:
        return f"gpt2-{m.group(1) or 'small'}"
    return key


def model_shape(model: str | nn.Module | Any, *, trainable_only: bool = False) -> ModelShape:
    """The :class:`ModelShape` of a name, a transformers config or an ``nn.Module``.

    Args:
        model: ``"llama-2-7b"``, ``"gpt2-xl"``, ``"7B"``, ... (see :func:`named_shapes`); a transformers
            ``PretrainedConfig``; or an ``nn.Module``.
        trainable_only: for a module, leave out parameters with ``requires_grad=False`` (default: keep them,
            marked ``trainable=False``, because frozen weights still take memory).

    Raises:
        ValueError: an unknown name (listing the known ones) or an unsupported object.

    Example:
        >>> shape = model_shape("llama-2-7b"); print(f"{shape.num_parameters:,}")
        6,738,415,616
    """
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str):
        key = _canonical(model)
        if key in _NAMED:
            return _NAMED[key]()
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*b", key)
        if m:
            return generic_decoder(float(m.group(1)))
        m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*m", key)
        if m:
            return generic_decoder(float(m.group(1)) / 1000)
        raise ValueError(
            f"unknown model {model!r}; known: {', '.join(named_shapes())}, or 'NB' for a generic "
            f"N-billion-parameter decoder (e.g. '7B', '1.5B')"
        )
    if isinstance(model, nn.Module):
        return _from_module(model, trainable_only=trainable_only)
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):
        return _from_config(model)
    raise ValueError(f"model must be a name, a transformers config or an nn.Module, got {type(model).__name__}")


def _architecture_from_config(config: Any, implementation: str = "transformers") -> Architecture | None:
    get = lambda *names, default=None: next(  # noqa: E731
        (getattr(config, n) for n in names if getattr(config, n, None) is not None), default
    )
    hidden = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head", "num_heads")
    vocab = get("vocab_size")
    if not all(isinstance(v, int) for v in (hidden, layers, heads, vocab)):
        return None
    model_type = getattr(config, "model_type", "")
    head_dim = get("head_dim", "d_kv", default=hidden // heads)
    kv_heads = get("num_key_value_heads", default=heads)
    if model_type == "t5":
        family, gated = "t5", bool(getattr(config, "is_gated_act", False))
        ffn = config.d_ff
        enc, layers = layers, get("num_decoder_layers", default=layers)
    elif model_type in ("gpt2", "gpt_neo", "gptj", "opt", "bloom", "gpt_neox", "falcon"):
        family, gated, enc = "gpt2", False, 0
        ffn = get("n_inner", "intermediate_size", "ffn_dim", default=4 * hidden) or 4 * hidden
    else:
        family, enc = (
            ("llama" if model_type in ("llama", "mistral", "qwen2", "qwen3", "gemma", "mixtral") else "decoder"),
            0,
        )
        ffn = get("intermediate_size", default=4 * hidden)
        act = str(get("hidden_act", "activation_function", default=""))
        gated = family == "llama" or "glu" in act
    drops = [
        get(n, default=0.0)
        for n in (
            "resid_pdrop",
            "embd_pdrop",
            "attn_pdrop",
            "attention_dropout",
            "hidden_dropout",
            "dropout_rate",
            "hidden_dropout_prob",
        )
    ]
    dropout = any(isinstance(d, (int, float)) and d > 0 for d in drops)
    context = get("max_position_embeddings", "n_positions", "n_ctx", default=512)
    attention = getattr(config, "_attn_implementation", None)
    dims = (layers, hidden, heads, kv_heads, head_dim, ffn, vocab)  # Architecture's order
    return Architecture(
        family,
        *map(int, dims),
        gated_mlp=gated,
        dropout=dropout,
        max_seq_len=int(context),
        encoder_layers=int(enc),
        implementation=implementation,
        attention=attention,
    )


def _from_module(model: nn.Module, *, trainable_only: bool) -> ModelShape:
    from ..param_groups import classify_parameters

    infos = classify_parameters(model, trainable_only=trainable_only)
    params = tuple(
        ParamShape(i.name, tuple(i.param.shape), i.role, i.param.dtype, i.param.requires_grad) for i in infos
    )
    config = getattr(model, "config", None)
    arch = _architecture_from_config(config) if config is not None else None
    return ModelShape(type(model).__name__, params, arch)


def _from_config(config: Any) -> ModelShape:
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a test dependency
        raise ValueError("planning from a transformers config needs transformers installed") from err
    model_type = getattr(config, "model_type", "")
    auto = (
        transformers.AutoModelForSeq2SeqLM
        if getattr(config, "is_encoder_decoder", False)
        else transformers.AutoModelForCausalLM
    )
    with torch.device("meta"):
        model = auto.from_config(config)
    shape = _from_module(model, trainable_only=False)
    return replace(shape, name=f"{model_type} config", params=tuple(replace(p, dtype=None) for p in shape.params))
