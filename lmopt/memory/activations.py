"""Activation memory of a transformer training step: what the forward pass keeps for the backward pass.

Two models are provided, both counting the tensors autograd saves, per token of a micro-batch
(``s`` tokens x ``b`` sequences), for hidden size ``h``, ``a`` heads, attention width ``A = a x head_dim``,
key/value width ``kv`` (grouped-query attention), MLP width ``f``, vocabulary ``V`` and ``e`` bytes per
activation element (2 for fp16/bf16, 4 for fp32):

``"korthikanti"`` -- Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
(arXiv:2205.05198), Section 4.1: per layer ``s b h (34 + 5 a s / h)`` bytes for a GPT layer in 16-bit with
dropout, generalised term by term:

==========================  =====================================  =========================================
attention block             ``e(h + h + A + 2 kv + A) + m h``      norm input, QKV input, Q, K and V,
                                                                   output-projection input, dropout mask
attention scores (no flash)  ``e a s + [m a s + e a s]``           softmax output [, dropout mask and output]
flash attention              ``4 a``                               log-sum-exp per row instead of the scores
MLP block                   ``e(h + h) + 2 e f + m h``             norm input, fc1 input, GeLU input, fc2
                                                                   input, dropout mask (gated MLP: ``4 e f``)
==========================  =====================================  =========================================

With ``e = 2``, ``A = kv = h``, ``f = 4h`` and 1-byte masks ``m`` this is exactly the paper's ``34 s b h``
plus ``5 a s^2 b``. Flash attention (Dao et al. 2022) keeps no ``s^2`` tensor (it recomputes the scores and
regenerates the dropout mask) -- the paper's "selective recomputation" of the attention core gives the same
saving. *Full* recomputation (activation checkpointing of every layer) keeps only each layer's input,
``e h`` per token (the paper's ``2 s b h``), and recomputes one layer at a time in the backward pass.

``"transformers"`` -- what transformers' PyTorch modules actually save (counted with
``torch.autograd.graph.saved_tensors_hooks`` on LlamaForCausalLM and GPT2LMHeadModel, transformers 5.x):
their RMSNorm upcasts its input to fp32 and keeps it (``4 + e`` per element per norm instead of ``e``),
GPT-2's ``gelu_new`` is written in Python and keeps 4 tensors of width ``f`` (5 with the fc2 input), GPT-2's
fused QKV output is kept whole (``3A``) beside copies of Q and the attention output; SDPA on Llama keeps Q,
K, V, the output and the log-sum-exp (no ``s^2``), eager attention keeps Q, the repeated K and V, the fp32
softmax and a copy of the output.

Both add the model's ends: token ids (8 bytes per token), the final norm and LM-head input, and the fp32
log-softmax of the cross-entropy (``4 V`` per token; transformers and Megatron both compute the loss in fp32).
Assumptions: no tensor or sequence parallelism (``t = 1``), no pipeline parallelism, the logits themselves are
not kept after the loss (``loss = model(...).loss``), dropout masks are one byte (CUDA; on CPU torch keeps
dropout noise in the activation dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import Architecture

__all__ = ["ACTIVATION_MODELS", "ActivationEstimate", "estimate_activations"]

ACTIVATION_MODELS = ("korthikanti", "transformers")
CHECKPOINTING = ("none", "selective", "full")


@dataclass(frozen=True)
class ActivationEstimate:
    """Activation bytes for one micro-batch (all layers), and the transients of the backward pass.

    Attributes:
        per_layer: bytes one transformer block keeps (as stored under the checkpointing mode).
        per_layer_full: bytes one block keeps without checkpointing (what recomputation rebuilds).
        layers: ``per_layer`` times the number of blocks (encoder and decoder).
        ends: token ids, final norm, LM-head input and the fp32 log-softmax of the loss.
        stored: everything kept at the end of the forward pass (``layers + ends``).
        loss_backward: transient at the start of backward: the fp32 gradients of the log-softmax output and of
            its input.
        layer_backward: transient while one block runs backward (gradients of its activations; under full
            checkpointing plus the recomputed block).
        logits: bytes of the logits (activation dtype) and their fp32 copy, alive at the end of the forward
            pass.
        model: the activation model used; ``notes``: what was assumed.
    """

    per_layer: int
    per_layer_full: int
    layers: int
    ends: int
    stored: int
    loss_backward: int
    layer_backward: int
    logits: int
    model: str
    notes: tuple[str, ...] = ()


def _attention(arch: Architecture, s: int, e: int, *, flash: bool, model: str, mask: float) -> float:
    """Bytes per token kept by one attention block, norm input included."""
    h, a, kv, att = arch.hidden_size, arch.num_heads, arch.kv_size, arch.attention_size
    drop = arch.dropout
    if model == "korthikanti":
        out = e * (h + h + att + 2 * kv + att) + (mask * h if drop else 0)
        if flash:
            out += 4 * a
        else:
            out += e * a * s + ((mask + e) * a * s if drop else 0)
        return out
    # transformers' modules
    if arch.family == "gpt2":
        out = e * h + e * h  # LayerNorm input (+ mean/rstd below), c_attn input
        out += 8  # LayerNorm mean and rstd, fp32
        out += e * 3 * att + e * att  # fused QKV output kept whole, a contiguous copy of Q
        if flash:
            out += e * att + e * att + 4 * a  # SDPA output, the c_proj input copy, log-sum-exp
        else:
            out += 4 * a * s + (0 if e == 4 else e * a * s) + e * att  # fp32 softmax (+ cast), c_proj input
        if drop:
            out += mask * h + (0 if flash else (mask + e) * a * s)
        return out
    # llama-style: RMSNorm keeps an fp32 copy of its input and the normalised tensor, then the QKV input
    out = (4 + e) * h + e * h
    if flash:
        out += e * (att + 2 * kv + att) + 4 * a  # SDPA keeps Q, K, V, output, log-sum-exp
    else:
        # eager: Q, K and V repeated to all heads, fp32 softmax (+ cast to e), contiguous output copy
        out += e * (att + 2 * att + att) + 4 * a * s + (0 if e == 4 else e * a * s)
    if drop:
        out += mask * h + (0 if flash else (mask + e) * a * s)
    return out


def _mlp(arch: Architecture, e: int, *, model: str, mask: float) -> float:
    h, f = arch.hidden_size, arch.intermediate_size
    if model == "korthikanti":
        out = e * 2 * h + (4 if arch.gated_mlp else 2) * e * f
    elif arch.family == "gpt2":
        out = e * 2 * h + 8 + 5 * e * f  # LayerNorm input and stats, c_fc input, gelu_new's 4 tensors + c_proj input
    else:
        out = (4 + e) * h + e * h + (4 if arch.gated_mlp else 2) * e * f
    return out + (mask * h if arch.dropout else 0)


def estimate_activations(
    arch: Architecture,
    *,
    micro_batch: int,
    seq_len: int,
    element_size: int,
    flash_attention: bool = True,
    checkpointing: str = "none",
    model: str = "korthikanti",
    mask_bytes: float = 1.0,
) -> ActivationEstimate:
    """Activation memory of one micro-batch (see the module docstring for the formulas and assumptions).

    Args:
        arch: the model's :class:`~lmopt.memory.shapes.Architecture`.
        micro_batch, seq_len: sequences per micro-batch and tokens per sequence.
        element_size: bytes per activation element (2 for fp16/bf16 autocast or pure 16-bit, 4 for fp32).
        flash_attention: attention keeps no ``s x s`` scores (FlashAttention / SDPA's flash or
            memory-efficient kernels).
        checkpointing: ``"none"``, ``"selective"`` (recompute the attention core: no ``s x s`` tensors kept)
            or ``"full"`` (keep each block's input only; recompute one block at a time in backward).
        model: ``"korthikanti"`` or ``"transformers"``.
        mask_bytes: bytes per dropout-mask element (1 on CUDA).

    Example:
        >>> from lmopt.memory.shapes import model_shape
        >>> est = estimate_activations(model_shape("gpt2-small").architecture, micro_batch=8, seq_len=1024,
        ...                            element_size=2, flash_attention=False)
    """
    if model not in ACTIVATION_MODELS:
        raise ValueError(f"activation_model must be one of {list(ACTIVATION_MODELS)}, got {model!r}")
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {list(CHECKPOINTING)}, got {checkpointing!r}")
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch} and {seq_len}")
    e, s, tokens = element_size, seq_len, micro_batch * seq_len
    h, V = arch.hidden_size, arch.vocab_size
    flash = flash_attention or checkpointing == "selective"
    kw = dict(model=model, mask=mask_bytes)
    attn_full = _attention(arch, s, e, flash=flash_attention, **kw)
    attn_kept = _attention(arch, s, e, flash=flash, **kw)
    mlp = _mlp(arch, e, **kw)
    per_layer_full = attn_full + mlp
    per_layer = attn_kept + mlp
    decoder_extra = 0.0
    if arch.encoder_layers:  # decoder blocks also attend to the encoder output (one more attention block)
        decoder_extra = attn_kept
    if checkpointing == "full":
        per_layer, decoder_extra = e * h, 0.0
    n_blocks = arch.num_layers + arch.encoder_layers
    layers = n_blocks * per_layer + arch.num_layers * decoder_extra
    norm_final = (4 + e) * h if model == "transformers" and arch.family != "gpt2" else e * h + 8
    ends = 8 + norm_final + e * h + 4 * V  # token ids, final norm, head input, fp32 log-softmax
    if arch.encoder_layers:
        ends += 8 + norm_final  # encoder ids and final norm
    # the fp32 gradients of the log-softmax output and input (the cast to e happens after the first is freed)
    loss_backward = 8 * V
    # one block's backward: gradients of its widest activations (two of width f) and of its input/output
    workspace = e * (2 * h + 2 * arch.intermediate_size)
    layer_backward = workspace + (per_layer_full + decoder_extra if checkpointing == "full" else 0)
    logits = (e + (0 if e == 4 else 4)) * V
    notes = [
        f"activations: {model} model, {'flash' if flash_attention else 'materialised'} attention, "
        f"checkpointing {checkpointing}, {e}-byte activations"
    ]
    return ActivationEstimate(
        per_layer=round(per_layer * tokens),
        per_layer_full=round(per_layer_full * tokens),
        layers=round(layers * tokens),
        ends=round(ends * tokens),
        stored=round((layers + ends) * tokens),
        loss_backward=round(loss_backward * tokens),
        layer_backward=round(layer_backward * tokens),
        logits=round(logits * tokens),
        model=model,
        notes=tuple(notes),
    )
