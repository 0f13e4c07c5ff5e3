"""Closed forms: activation memory of transformer training, optimizer states, KV cache.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models" (https://arxiv.org/abs/2205.05198), Sec. 4.1: a layer with hidden size ``h``,
``a`` heads, sequence ``s`` and micro-batch ``b`` keeps, in 16-bit activations with 1-byte dropout
masks, ::

    attention  11 s b h + 5 a s^2 b     (QKV input 2sbh, Q and K 4sbh, softmax 2as^2b, its dropout
                                         mask as^2b and output 2as^2b, V 2sbh, output projection
                                         input 2sbh, its dropout mask sbh)
    MLP        19 s b h                  (input 2sbh, GeLU input 8sbh, GeLU output 8sbh, mask sbh)
    norms       4 s b h
    total      s b h (34 + 5 a s / h)    per layer, without recomputation

With full recomputation (activation checkpointing of every layer) only the layer input,
``2 s b h`` per layer, is kept, plus one layer's activations while it is recomputed in backward;
with *selective* recomputation the ``5 a s^2 b`` attention-score term is recomputed and
``34 s b h`` remain. The seed article's "layers x batch x seq x hidden x bytes" is exactly the
full-recomputation term.

This module evaluates the same sum term by term, generalised to what the code at hand keeps
(``peftlab.estimate.count`` finds the terms on the meta device):

* a linear layer keeps its input only when its weight trains (a frozen weight passes the gradient
  on with the weight alone); inputs shared by several layers (``q/k/v``, ``gate/up``) count once;
  an adapter that casts its input to its own dtype keeps that copy;
* grouped-query attention keeps ``K`` and ``V`` with ``kv_heads``; gated MLPs (SwiGLU) keep the
  gate input, the activation output and the up projection (3 tensors of width ``I``);
* memory-efficient attention kernels (FlashAttention, Dao et al. 2022,
  https://arxiv.org/abs/2205.14135; PyTorch's SDPA kernels) keep ``Q, K, V``, the output and the
  log-sum-exp instead of the ``s^2`` scores; the math/eager path keeps the scores. Which kernel
  PyTorch picks depends on the dtype, the mask and grouped-query inputs (:func:`attention_impl`):
  fp32 grouped-query attention on CUDA runs the math path;
* dropout masks are 1 byte on CUDA (``native_dropout``) and a full activation-dtype tensor on CPU
  (``at::dropout`` multiplies by a noise tensor there); on CPU the SDPA math path computes 16-bit
  attention in fp32 and keeps fp32 tensors;
* transformers' Python RMSNorm keeps an fp32 upcast of its input, and the normalised input when
  its weight trains;
* a causal-LM loss keeps the fp32 log-softmax of the logits (``4 b s V`` bytes) and needs two more
  fp32 buffers of that size at the start of backward.

:func:`korthikanti_layer` is the paper's formula itself; ``tests/test_estimate.py`` checks that the
term-by-term sum reproduces it for the paper's setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from peftlab.estimate.count import AttentionCall, Site, Structure

ATTENTION = ("auto", "flash", "math", "eager")
CHECKPOINTING = ("none", "selective", "full")


def korthikanti_layer(s: int, b: int, h: int, a: int) -> float:
    """Korthikanti et al. 2022, Eq. (1): bytes one layer keeps with no recomputation (16-bit)."""
    return s * b * h * (34 + 5 * a * s / h)


def element_bytes(spec: str | int, e: int, mask: int) -> int:
    """Bytes per element of a :class:`Site`: the activation dtype, a dropout mask, or fixed."""
    if spec == "act":
        return e
    if spec == "mask":
        return mask
    return int(spec)


def site_bytes(site: Site, batch: int, tokens: int, e: int, mask: int) -> float:
    """Bytes a site keeps for ``batch`` sequences of ``tokens`` positions."""
    n = batch * tokens if site.per_token else batch
    return n * site.width * site.count * element_bytes(site.bytes, e, mask)


def attention_impl(call: AttentionCall, attention: str, device: str, e: int = 2) -> str:
    """Which kernel runs; ``auto`` follows PyTorch's SDPA dispatch.

    On CUDA, FlashAttention takes 16-bit inputs with ``head_dim <= 256`` and no explicit mask
    (grouped-query inputs included); otherwise the memory-efficient kernel runs (fp32, masks and
    dropout; the same memory terms, no ``s^2`` scores), except for grouped-query calls
    (``enable_gqa``), which it does not take: those fall to the math path, which keeps the ``s^2``
    softmax. (fp32 training of a GQA model without a mask, e.g. a causal LM, is that case.) On
    CPU the flash kernel runs without dropout, else the math path.

    Args:
        e: Bytes per element of the attention inputs.
    """
    if attention != "auto":
        return attention
    if device == "cuda":
        if e <= 2 and call.head_dim <= 256 and not call.masked:
            return "flash"
        return "math" if call.gqa else "flash"
    return "flash" if call.dropout == 0 else "math"


def attention_bytes(call: AttentionCall, batch: int, s_q: int, s_k: int, e: int, mask: int, impl: str,
                    keep_scores: bool = True) -> tuple[float, float]:
    """``(kept without the s^2 terms, s^2 terms)`` of one attention call, in bytes.

    Args:
        impl: ``flash`` (Q, K, V, output O and fp32 log-sum-exp), ``math`` (PyTorch's SDPA math path:
            Q, K, V, softmax, dropout mask and output), or ``eager`` (transformers' eager attention:
            K and V repeated to all heads, softmax in fp32, a cast copy or the dropout output).
        keep_scores: False under selective recomputation (the s^2 terms are recomputed).
    """
    a, d = call.heads, call.head_dim
    q = batch * s_q * a * d * e
    if impl == "flash":
        kv = 2 * batch * s_k * call.kv_heads * d * e
        return q + kv + batch * s_q * a * d * e + 4 * batch * a * s_q, 0.0
    heads_kv = a if (call.gqa or impl == "eager") else call.kv_heads
    kv = 2 * batch * s_k * heads_kv * d * e
    scores = batch * a * s_q * s_k
    dropout = call.dropout > 0
    if impl == "math":
        per = e + ((mask + e) if dropout else 0)
    elif impl == "eager":
        per = 4 + ((mask + e) if dropout else (e if e < 4 else 0))
    else:
        raise ValueError(f"attention must be one of {ATTENTION} (got {impl!r})")
    return q + kv, scores * per if keep_scores else 0.0


@dataclass(frozen=True)
class Activations:
    """Activation bytes, with the terms that explain them.

    Attributes:
        total: What applies under the chosen checkpointing.
        layers: Every block's kept tensors without recomputation (the Korthikanti sum).
        checkpointed_inputs: Block inputs, ``layers x batch x seq x hidden x bytes``: what full
            recomputation keeps.
        recomputed_layer: The largest block, live again while it is recomputed in backward.
        scores: The ``s^2`` attention terms inside ``layers`` (zero for flash kernels).
        outside: Embedding, final norm and head tensors outside the blocks.
        loss: The fp32 log-softmax the LM loss keeps.
        loss_transient: fp32 buffers of the loss gradient at the start of backward.
        per_block: ``(block, bytes kept without recomputation)`` in forward order (attention
            scores included unless selective recomputation drops them).
        inputs_per_block: ``(block, input bytes)``: what full recomputation keeps per block.
        outside_after: The part of ``outside`` after the blocks (final norm, LM-head input),
            freed before the blocks' backward; the rest (embeddings side) lives to the end.
        scores_per_block: ``(block, s^2 bytes)``; under selective recomputation these are
            recomputed (live again) during the block's backward.
        logits: The LM head's output in the activation dtype, alive while the loss is computed.
        logits_upcast: The loss' fp32 copy of the logits (0 when the logits are fp32 already).
    """

    total: float
    layers: float
    checkpointed_inputs: float
    recomputed_layer: float
    scores: float
    outside: float
    loss: float
    loss_transient: float
    applies: str
    per_block: tuple[tuple[int, float], ...] = ()
    inputs_per_block: tuple[tuple[int, float], ...] = ()
    outside_after: float = 0.0
    scores_per_block: tuple[tuple[int, float], ...] = ()
    logits: float = 0.0
    logits_upcast: float = 0.0


def activations(st: Structure, batch: int, seq: int, e: int, device: str, attention: str,
                checkpointing: str, virtual_tokens: int, prefix_tokens: int, autocast: bool = False) -> Activations:
    """Activation bytes of one training forward (see the module docstring).

    Args:
        e: Bytes per activation element (2 under mixed precision, else the weight dtype's).
        autocast: Mixed precision runs under autocast, which casts every linear layer's input to
            16 bits: an adapter's cast copy of its input is then kept in 16 bits too.
    """
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING} (got {checkpointing!r})")
    mask = 1 if device == "cuda" else e
    s_q = seq + virtual_tokens
    s_k = s_q + prefix_tokens
    per_block: dict[int, float] = {b: 0.0 for b, _ in st.block_inputs}
    scores_total = 0.0
    impls = {a.block: attention_impl(a, attention, device, e) for a in st.attention}
    outside = outside_after = 0.0
    for site in st.sites:
        if site.kind == "attention-output" and impls.get(site.block) == "flash":
            continue  # the flash kernel's output O is this tensor; counted with the attention
        if autocast and site.kind in ("linear-input", "attention-output"):
            site = replace(site, bytes="act")
        n = site_bytes(site, batch, s_q, e, mask)
        if site.block is None:
            outside += n
            outside_after += n if site.after else 0.0
        else:
            per_block[site.block] = per_block.get(site.block, 0.0) + n
    keep_scores = checkpointing != "selective"
    scores_by_block: dict[int, float] = {}
    for call in st.attention:
        impl = impls[call.block]
        # PyTorch's math path computes 16-bit attention in fp32 on CPU (and keeps those tensors).
        ea, ma = (4, 4) if impl == "math" and device == "cpu" else (e, mask)
        kept, scores = attention_bytes(call, batch, s_q, s_k, ea, ma, impl, keep_scores)
        scores_total += scores
        key = call.block if call.block is not None else -1
        per_block[key] = per_block.get(key, 0.0) + kept + scores
        if not keep_scores:  # recomputed in the block's backward: live again there
            scores_by_block[key] = scores_by_block.get(key, 0.0) + attention_bytes(call, batch, s_q, s_k, ea, ma,
                                                                                     impl, True)[1]
    layers = sum(per_block.values())
    inputs = sum(batch * s_q * width * e for _, width in st.block_inputs)
    biggest = max(per_block.values(), default=0.0)
    loss = 4.0 * batch * s_q * st.loss_vocab
    transient = 8.0 * batch * s_q * st.loss_vocab
    logits = float(e) * batch * s_q * st.loss_vocab
    upcast = 4.0 * batch * s_q * st.loss_vocab if e < 4 else 0.0
    inputs_by_block = {b: batch * s_q * width * e for b, width in st.block_inputs}
    order = sorted(per_block)
    if checkpointing == "full":
        total, applies = inputs + biggest + outside + loss, "full recomputation: block inputs + one recomputed block"
    else:
        total = layers + outside + loss
        applies = ("selective recomputation: all kept tensors but the attention scores" if checkpointing == "selective"
                   else "no recomputation: every tensor kept for backward")
    return Activations(total, layers, inputs, biggest, scores_total, outside, loss, transient, applies,
                       tuple((b, per_block[b]) for b in order), tuple(sorted(inputs_by_block.items())), outside_after,
                       tuple(sorted(scores_by_block.items())), logits, upcast)


def backward_transient(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, gated: bool,
                       tokens: int, s_q: int, s_k: int, batch: int, e: int, attention: str) -> float:
    """Bytes one block's backward allocates beyond its saved tensors and the weight gradients: the
    gradients of its activations while they flow through it. The larger of

    * the MLP: the incoming gradient and the gradient of the block input (``2 h``) plus the
      gradients of the intermediate tensors live at once (``3 I`` for a gated MLP: of the product,
      of the gate and of the up projection; ``2 I`` otherwise);
    * the attention: the incoming gradient and ``dQ, dK, dV`` (``2 a d + 2 kv d``), plus, for
      memory-efficient kernels, the fp32 ``dQ`` accumulator of FlashAttention-2's backward
      (``4 a d`` bytes per token), or, on the math path, the gradients of the softmax and of the
      scores (``2 a s_q s_k`` elements).

    Every term is per token of the micro-batch (``tokens = batch x s_q``).
    """
    mlp = tokens * e * ((3 if gated else 2) * intermediate + 2 * hidden)
    attn = tokens * e * (2 * heads * head_dim + 2 * kv_heads * head_dim)
    if attention in ("flash",):
        attn += tokens * 4 * heads * head_dim
    else:
        attn += 2.0 * batch * heads * s_q * s_k * e
    return float(max(mlp, attn))


def prefill_bytes(hidden: int, heads: int, kv_heads: int, head_dim: int, intermediate: int, gated: bool,
                  vocab: int, batch: int, seq: int, e: int, attention: str) -> float:
    """Peak activation bytes of an inference forward over ``seq`` tokens (nothing kept for backward).

    One layer's tensors are live at a time: the residual stream and normalised input with either the
    attention's Q, K, V and output (plus the ``s^2`` scores outside flash kernels) or the MLP's
    intermediate tensors; generation computes the logits of the last position only (fp32).
    """
    tokens = batch * seq
    attn = tokens * (2 * hidden + (2 * heads + 2 * kv_heads) * head_dim) * e
    if attention != "flash":
        attn += batch * heads * seq * seq * (4 + e)
    mlp = tokens * (2 * hidden + (3 if gated else 2) * intermediate) * e
    return max(attn, mlp) + batch * vocab * (e + 4)


def kv_cache_bytes(layers: int, sliding_layers: int, window: int | None, kv_heads: int, head_dim: int,
                   batch: int, context: int, e: int) -> float:
    """Keys and values of every layer for ``context`` positions: ``2 L b c kv_heads head_dim`` elements
    (Pope et al. 2022, "Efficiently Scaling Transformer Inference", https://arxiv.org/abs/2211.05102);
    sliding-window layers keep at most ``window`` positions."""
    full = layers - sliding_layers
    capped = min(context, window) if window else context
    return 2.0 * batch * kv_heads * head_dim * e * (full * context + sliding_layers * capped)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def adafactor_elements(shape: tuple[int, ...]) -> int:
    """Second-moment elements of Adafactor (Shazeer & Stern 2018, https://arxiv.org/abs/1804.04235):
    a row and a column vector for matrices (factored), the full tensor otherwise."""
    if len(shape) >= 2:
        rows = math.prod(shape[:-1])
        cols = math.prod(shape[:-2]) * shape[-1]
        return rows + cols
    return math.prod(shape)
