"""GaLore: gradient low-rank projection (Zhao et al. 2024, https://arxiv.org/abs/2403.03507).

Full-parameter training with the optimizer memory of a low-rank method. For every targeted 2-D
weight ``W`` (m x n) with gradient ``G``:

1. every ``update_proj_gap`` steps (from the first), the projector is refreshed from the SVD of
   the current gradient, ``G = U S V^T``: ``P = U[:, :r]`` (m x r) when ``m <= n`` (left
   projection), else ``Q = V[:, :r]`` (n x r) (right projection), as in the paper;
2. the gradient is projected, ``R = P^T G`` (r x n) or ``R = G Q`` (m x r), and Adam runs on
   ``R``: its two moments live in the r-dimensional space (the memory saving), with bias
   correction;
3. the Adam direction ``N`` is projected back (``P N`` or ``N Q^T``), scaled by ``scale`` and
   applied with the learning rate; weight decay is decoupled (``W *= 1 - lr * wd``) as in AdamW.

Every other trainable tensor (embeddings, norms, biases, the head) gets plain AdamW. The moments
are not reset when the projector changes (the paper's choice).

Variants:

* ``eight_bit=True``: the moments of every tensor with at least :data:`MIN_8BIT_SIZE`
  elements are stored in 8 bits, block-wise with an fp32 absmax per block of
  :data:`BLOCK` (``quantizer="blockwise"``: peftlab's own companded int8 code, any device;
  ``"bitsandbytes"``: bitsandbytes' dynamic quantization map, CUDA; ``"auto"``: bitsandbytes on
  CUDA when installed, else blockwise). Each step dequantizes, updates in the parameter's dtype
  and quantizes again.
* ``layerwise=True``: each parameter is stepped inside its post-accumulate-grad hook during
  ``backward`` and its gradient is freed at once, so the full gradients of the model never
  exist together. ``optimizer.step()`` then only closes the step. Gradient accumulation (two
  backward passes before ``step()``) and multi-process data parallelism are refused: the
  first would update on partial gradients, the second before gradients are averaged. Global
  gradient clipping cannot apply (no gradient outlives its hook).

The state (``state_dict``) holds tensors and plain Python values only (the projectors are
tensors), so it loads with ``torch.load(weights_only=True)`` and resumes exactly.

Example:
    >>> opt = GaLoreAdamW.for_model(model, targets=[r".*attn.*", r".*mlp.*"], lr=1e-3, rank=128,
    ...                             update_proj_gap=200, scale=0.25)
    >>> trainer = transformers.Trainer(model=model, args=args, optimizers=(opt, None), ...)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from peftlab.core.errors import ConfigError

__all__ = ["BLOCK", "DEFAULT_TARGETS", "MIN_8BIT_SIZE", "GaLoreAdamW", "check_layerwise", "galore_param_groups",
           "galore_weights", "state_bytes", "state_layout"]

DEFAULT_TARGETS: tuple[str, ...] = (r".*attn.*", r".*mlp.*", r".*attention.*", r".*intermediate.*",
                                    r".*\.output\..*", r".*Attention.*", r".*DenseReluDense.*", r".*\.ffn\..*",
                                    r".*\.fc[12]")
"""Attention and feed-forward linears of Llama-family and GPT-2 models (``self_attn``/``attn``,
``mlp``), BERT (``attention``, ``intermediate``, ``output``), T5 (``SelfAttention``,
``EncDecAttention``, ``DenseReluDense``), DistilBERT (``ffn``) and BART/OPT (``fc1``, ``fc2``);
full-matched regular expressions."""
BLOCK = 256
"""Elements per quantization block of the 8-bit moments (one fp32 absmax each)."""
CHUNK = BLOCK * 4096
"""Elements of 8-bit moments dequantized at a time in a step (bounds the step's temporaries)."""
MIN_8BIT_SIZE = 4096
"""Moment tensors smaller than this stay in the parameter's dtype (as bitsandbytes does)."""
QUANTIZERS = ("auto", "blockwise", "bitsandbytes")
_QUANT_KEYS = ("exp_avg_q", "exp_avg_absmax", "exp_avg_sq_q", "exp_avg_sq_absmax")


# ----------------------------------------------------------------------------- targets
def _linear_types() -> tuple[type, ...]:
    """``nn.Linear`` and, where transformers is installed, GPT-2's ``Conv1D`` (its weight is the
    transposed matrix: GaLore projects whichever side is shorter, so the orientation is immaterial)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return (nn.Linear,)
    return (nn.Linear, Conv1D)


def galore_weights(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS) -> dict[str, nn.Parameter]:
    """The 2-D ``nn.Linear`` weights GaLore projects: ``{parameter name: parameter}``.

    A module is targeted when its path full-matches one of the regular expressions ``targets``
    (``r".*attn.*"`` matches ``model.layers.0.self_attn.q_proj``). ``nn.Linear`` and GPT-2's
    ``Conv1D`` count. Modules inside adapters are never targets.

    Raises:
        TargetError: No ``nn.Linear`` matches (the message lists the linear module names).
    """
    from peftlab.core.targets import regex_select

    paths = regex_select(model, targets, supported=_linear_types(), what="galore")
    out = {}
    for path in paths:
        w = model.get_submodule(path).weight
        if isinstance(w, nn.Parameter) and w.dim() == 2:
            out[f"{path}.weight"] = w
    return out


def _no_decay(name: str, param: nn.Parameter) -> bool:
    return param.ndim < 2 or name.endswith("bias") or "norm" in name.lower()


def galore_param_groups(model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, *, weight_decay: float = 0.0,
                        rank: int | None = None, update_proj_gap: int | None = None,
                        scale: float | None = None) -> list[dict[str, Any]]:
    """Parameter groups for :class:`GaLoreAdamW` over the trainable parameters of ``model``.

    One GaLore group (the targeted weights that require grad, ``"galore": True``), then plain
    AdamW groups: with ``weight_decay`` for other matrices, without it for biases, norms and
    other vectors (the lab trainer's rule). ``rank``, ``update_proj_gap`` and ``scale`` given
    here override the optimizer's defaults for the GaLore group.

    Raises:
        TargetError: The targets match no ``nn.Linear``.
        ConfigError: The matched weights are all frozen.
    """
    targeted = galore_weights(model, targets)
    trainable = dict(model.named_parameters())
    galore = [p for p in targeted.values() if p.requires_grad]
    if not galore:
        raise ConfigError(f"galore: the targets {list(targets)} match {len(targeted)} weight(s), none of which "
                          "requires grad; unfreeze them (GaLore trains the weights themselves)")
    ids = {id(p) for p in galore}
    rest = {n: p for n, p in trainable.items() if p.requires_grad and id(p) not in ids}
    group: dict[str, Any] = {"params": galore, "galore": True, "weight_decay": weight_decay}
    for key, value in (("rank", rank), ("update_proj_gap", update_proj_gap), ("scale", scale)):
        if value is not None:
            group[key] = value
    decay = [p for n, p in rest.items() if not _no_decay(n, p)]
    plain = [p for n, p in rest.items() if _no_decay(n, p)]
    groups = [group]
    groups += [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
               if g["params"]]
    return groups


# ----------------------------------------------------------------------------- 8-bit codecs
def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    flat = x.reshape(-1).float()
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK), pad


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """peftlab's own 8-bit code: per block of :data:`BLOCK`, ``y = x / absmax`` is companded
    (``sign(y) sqrt|y|`` for the signed first moment, ``y^(1/4)`` for the non-negative second
    moment, so small values keep relative precision) and rounded to int8 / uint8.

    Returns:
        ``(codes, absmax)``: codes with ``x``'s number of elements, one fp32 absmax per block.
    """
    blocks, pad = _blocks(x)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    y = blocks / absmax[:, None]
    if signed:
        codes = (y.sign() * y.abs().sqrt() * 127).round().to(torch.int8)
    else:
        codes = (y.clamp_min(0).sqrt().sqrt() * 255).round().to(torch.uint8)
    codes = codes.reshape(-1)
    return (codes[:codes.numel() - pad] if pad else codes), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`, shaped and typed like ``like``."""
    blocks, _ = _blocks(codes)
    if codes.dtype == torch.int8:
        y = blocks / 127
        y = y.sign() * y * y
    else:
        y = (blocks / 255) ** 4
    return (y * absmax[:, None]).reshape(-1)[:like.numel()].view(like.shape).to(like.dtype)


def _bnb() -> Any:
    from peftlab.quant import import_bitsandbytes  # the one place bitsandbytes is imported

    if import_bitsandbytes() is None:
        raise ConfigError("quantizer='bitsandbytes' needs bitsandbytes (pip install bitsandbytes); "
                          "quantizer='blockwise' is peftlab's own 8-bit path and needs nothing")
    import bitsandbytes.functional as bnbf

    return bnbf


_CODES: dict[tuple[bool, str], torch.Tensor] = {}


def _bnb_code(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _CODES:
        _CODES[key] = _bnb().create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def quantize_bnb(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' block-wise dynamic 8-bit quantization (``quantize_blockwise``)."""
    bnbf = _bnb()
    codes, qstate = bnbf.quantize_blockwise(x.float().reshape(-1).contiguous(), code=_bnb_code(signed, x.device),
                                            blocksize=BLOCK)
    return codes, qstate.absmax.float()


def dequantize_bnb(codes: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor, signed: bool) -> torch.Tensor:
    bnbf = _bnb()
    out = bnbf.dequantize_blockwise(codes, absmax=absmax, code=_bnb_code(signed, codes.device), blocksize=BLOCK)
    return out.view(like.shape).to(like.dtype)


# ----------------------------------------------------------------------------- the optimizer
class GaLoreAdamW(torch.optim.Optimizer):
    """AdamW with GaLore gradient projection on the parameter groups marked ``"galore": True``.

    Args:
        params: Parameters or groups (see :func:`galore_param_groups`). A group with
            ``"galore": True`` holds 2-D weights to project; it may override ``rank``,
            ``update_proj_gap`` and ``scale``. Other groups get plain AdamW.
        lr, betas, eps, weight_decay: As ``torch.optim.AdamW`` (decoupled weight decay).
        rank: Projection rank r. The paper uses 128-1024 for 7B models (hidden 4096) and
            about a quarter of the hidden size for smaller ones. A rank above ``min(m, n)`` of
            a weight is clamped to it, with a warning (that weight then saves no memory).
        update_proj_gap: Steps between projector refreshes (SVD of the gradient); 50-1000
            in the paper and its users' runs (200 by default).
        scale: Multiplier of the back-projected update (the paper's alpha, 0.25 by default;
            users tune 0.25-2, higher with a lower learning rate).
        eight_bit: Store the moments in 8 bits (see the module docstring).
        quantizer: ``"auto"``, ``"blockwise"`` (peftlab's, any device) or ``"bitsandbytes"`` (CUDA).
        layerwise: Step each parameter in its post-accumulate-grad hook and free its gradient.

    Raises:
        ConfigError: Bad hyperparameters, a GaLore group with a tensor that is not 2-D,
            bitsandbytes requested off CUDA, or ``layerwise`` in a multi-process run.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, eight_bit: bool = False, quantizer: str = "auto",
                 layerwise: bool = False) -> None:
        _check_hyper(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                     update_proj_gap=update_proj_gap, scale=scale)
        if quantizer not in QUANTIZERS:
            raise ConfigError(f"galore: quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale, "galore": False}
        super().__init__(params, defaults)
        self.eight_bit = bool(eight_bit)
        self.layerwise = bool(layerwise)
        self.quantizer = self._pick_quantizer(quantizer) if self.eight_bit else "none"
        clamped = []
        for group in self.param_groups:
            _check_hyper(lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                         rank=group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"])
            if group["galore"]:
                for p in group["params"]:
                    if p.dim() != 2:
                        raise ConfigError(f"galore: the GaLore group holds a tensor of shape {tuple(p.shape)}; "
                                          "only 2-D weights can be projected (put the others in a plain group)")
                    if group["rank"] > min(p.shape):
                        clamped.append(tuple(p.shape))
        if clamped:
            shown = ", ".join(map(str, sorted(set(clamped))[:4]))
            warnings.warn(f"galore: rank exceeds min(m, n) of {len(clamped)} weight(s) (shapes {shown}); clamped to "
                          "min(m, n) for them, where the projection keeps the whole gradient and saves no memory. "
                          "Choose a rank below the smaller dimension (about a quarter of the hidden size).",
                          stacklevel=2)
        self._hooks: list[Any] = []
        self._stepped: set[int] = set()
        if self.layerwise:
            self._install_hooks()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def for_model(cls, model: nn.Module, targets: Sequence[str] = DEFAULT_TARGETS, *, lr: float = 1e-3,
                  weight_decay: float = 0.0, **options: Any) -> GaLoreAdamW:
        """GaLore on the ``targets`` of ``model``, plain AdamW on its other trainable parameters."""
        return cls(galore_param_groups(model, targets, weight_decay=weight_decay), lr=lr, weight_decay=weight_decay,
                   **options)

    def _pick_quantizer(self, quantizer: str) -> str:
        on_cuda = any(p.is_cuda for g in self.param_groups for p in g["params"])
        if quantizer == "auto":
            if on_cuda:
                try:
                    _bnb()
                    return "bitsandbytes"
                except ConfigError:
                    return "blockwise"
            return "blockwise"
        if quantizer == "bitsandbytes":
            if not on_cuda:
                raise ConfigError("galore: quantizer='bitsandbytes' runs on CUDA and these parameters are not on a "
                                  "GPU; use quantizer='blockwise' (peftlab's own 8-bit moments, CPU or GPU) or "
                                  "'auto'")
            _bnb()
        return quantizer

    def _install_hooks(self) -> None:
        import torch.distributed as dist

        check_layerwise(True, distributed=dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1)
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._hooks.append(p.register_post_accumulate_grad_hook(self._hook_for(group)))

    def _hook_for(self, group: dict[str, Any]) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if id(p) in self._stepped:
                self._stepped.clear()
                raise ConfigError("galore: layerwise=True updates each parameter as soon as its gradient is "
                                  "ready, and a second backward pass reached it before optimizer.step(): gradient "
                                  "accumulation cannot work layer-wise. Use grad_accum=1 (or "
                                  "gradient_accumulation_steps=1), or layerwise=False")
            self._stepped.add(id(p))
            with torch.no_grad():
                self._update(p, p.grad, group)
            p.grad = None

        return hook

    def remove_hooks(self) -> None:
        """Remove the layer-wise backward hooks (the optimizer then does nothing on ``step``)."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def check_training(self, *, grad_accum: int = 1, distributed: bool = False) -> None:
        """Refuse training settings this optimizer cannot follow (see :func:`check_layerwise`)."""
        check_layerwise(self.layerwise, grad_accum=grad_accum, distributed=distributed)

    # ------------------------------------------------------------------ stepping
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step over every parameter with a gradient (layer-wise: closes the step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.layerwise:
            self._stepped.clear()
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, p.grad, group)
        return loss

    def _update(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if grad.is_sparse:
            raise ConfigError("galore: sparse gradients are not supported")
        state = self.state[p]
        if not state:
            self._init_state(p, state, group)
        state["step"] += 1
        lr, wd = group["lr"], group["weight_decay"]
        if group["galore"]:
            if (state["step"] - 1) % group["update_proj_gap"] == 0:
                state["projector"] = _projector(grad, state["rank"], state["right"]).to(p.dtype)
            proj = state["projector"]
            low = grad @ proj if state["right"] else proj.T @ grad
            direction = self._adam(low, state, group)
            full = direction @ proj.T if state["right"] else proj @ direction
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(full, alpha=-lr * group["scale"])
        else:
            direction = self._adam(grad, state, group)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(direction, alpha=-lr)

    def _init_state(self, p: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        state["step"] = 0
        shape = tuple(p.shape)
        if group["galore"]:
            m, n = shape
            state["rank"] = min(int(group["rank"]), m, n)
            state["right"] = m > n  # a bool, not a string: load_state_dict re-creates iterables
            shape = (state["rank"], n) if m <= n else (m, state["rank"])
        numel = math.prod(shape)
        if self.eight_bit and numel >= MIN_8BIT_SIZE:  # flat codes, one fp32 absmax per block
            chunk = torch.zeros(min(numel, CHUNK), dtype=p.dtype, device=p.device)
            for name, signed in (("exp_avg", True), ("exp_avg_sq", False)):
                codes, absmax = self._quantize(chunk, signed)  # zeros: every block has the same codes
                state[f"{name}_q"] = codes.repeat(math.ceil(numel / codes.numel()))[:numel].clone()
                state[f"{name}_absmax"] = absmax[:1].repeat(math.ceil(numel / BLOCK))
        else:
            zeros = torch.zeros(shape, dtype=p.dtype, device=p.device)
            state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()

    def _quantize(self, x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_bnb(x, signed) if self.quantizer == "bitsandbytes" else quantize_blockwise(x, signed)

    def _dequantize(self, codes: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor, signed: bool) -> torch.Tensor:
        if self.quantizer == "bitsandbytes":
            return dequantize_bnb(codes, absmax, like, signed)
        return dequantize_blockwise(codes, absmax, like)

    def _adam(self, g: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        """The Adam direction ``m_hat / (sqrt(v_hat) + eps)`` for gradient ``g``, moments updated."""
        if "exp_avg_q" not in state:
            return _adam_direction(g, state["exp_avg"], state["exp_avg_sq"], state["step"], group)
        # 8-bit: dequantize, update and re-quantize a chunk of whole blocks at a time, so the
        # full-precision moments of a large tensor (an embedding) never exist at once
        direction = torch.empty_like(g)
        flat_g, flat_d = g.reshape(-1), direction.view(-1)
        for start in range(0, flat_g.numel(), CHUNK):
            gc = flat_g[start:start + CHUNK]
            codes = slice(start, start + gc.numel())
            blocks = slice(start // BLOCK, math.ceil((start + gc.numel()) / BLOCK))
            m = self._dequantize(state["exp_avg_q"][codes], state["exp_avg_absmax"][blocks], gc, True)
            v = self._dequantize(state["exp_avg_sq_q"][codes], state["exp_avg_sq_absmax"][blocks], gc, False)
            flat_d[codes] = _adam_direction(gc, m, v, state["step"], group)
            for key, moment, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
                q, absmax = self._quantize(moment, signed)
                state[f"{key}_q"][codes] = q
                state[f"{key}_absmax"][blocks] = absmax
        return direction

    # ------------------------------------------------------------------ state
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer``, but the 8-bit codes' fp32 absmax values keep their dtype
        (the base class would cast every floating tensor to its parameter's dtype)."""
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key in _QUANT_KEYS:
                if i in saved and key in saved[i]:
                    self.state[p][key] = saved[i][key].to(p.device)

    def state_bytes(self, params: Iterable[torch.Tensor] | None = None) -> int:
        """Bytes of optimizer state tensors (moments, codes, projectors) of ``params`` (all when None)."""
        chosen = None if params is None else {id(p) for p in params}
        return sum(t.numel() * t.element_size() for p, s in self.state.items()
                   if chosen is None or id(p) in chosen for t in s.values() if isinstance(t, torch.Tensor))


def state_layout(shape: Sequence[int], *, rank: int | None, eight_bit: bool = False) -> tuple[int, int]:
    """:class:`GaLoreAdamW`'s state for one tensor as ``(elements in the parameter's dtype, bytes
    of 8-bit codes and their fp32 absmax)``. A GaLore weight (``rank`` given) holds a projector
    (min(m, n) x r) and two r-space moments; any other tensor two full-size moments. Moments of
    :data:`MIN_8BIT_SIZE` elements or more are 8-bit when ``eight_bit``."""
    numel = math.prod(shape)
    projector = 0
    if rank is not None:
        m, n = shape
        r = min(rank, m, n)
        projector, numel = min(m, n) * r, r * max(m, n)
    if eight_bit and numel >= MIN_8BIT_SIZE:
        return projector, 2 * (numel + math.ceil(numel / BLOCK) * 4)
    return projector + 2 * numel, 0


def state_bytes(shape: Sequence[int], *, rank: int | None, elem: int, eight_bit: bool = False) -> int:
    """Bytes of :class:`GaLoreAdamW` state for one tensor whose dtype has ``elem`` bytes
    (see :func:`state_layout`); equals what :meth:`GaLoreAdamW.state_bytes` measures."""
    elements, fixed = state_layout(shape, rank=rank, eight_bit=eight_bit)
    return elements * elem + fixed


def check_layerwise(layerwise: bool, *, grad_accum: int = 1, distributed: bool = False) -> None:
    """Refuse layer-wise updates with gradient accumulation or data parallelism.

    Raises:
        ConfigError: ``layerwise`` with ``grad_accum > 1`` or ``distributed``.
    """
    if layerwise and grad_accum > 1:
        raise ConfigError(f"galore: layerwise=True steps each parameter inside backward, so gradient "
                          f"accumulation (grad_accum={grad_accum}) would update on partial gradients; use "
                          "grad_accum=1 (a larger batch_size instead) or layerwise=False")
    if layerwise and distributed:
        raise ConfigError("galore: layerwise=True steps each parameter before data-parallel gradients are averaged "
                          "across processes; use layerwise=False with DDP")


def _adam_direction(g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, group: dict[str, Any]) -> torch.Tensor:
    """Update the moments ``m``, ``v`` in place with ``g`` (step ``t``, 1-based) and return
    ``m_hat / (sqrt(v_hat) + eps)`` with torch.optim.AdamW's rounding order."""
    beta1, beta2 = group["betas"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    denom = (v.sqrt() / math.sqrt(bc2)).add_(group["eps"])
    return (m / bc1).div_(denom)


def _projector(grad: torch.Tensor, rank: int, right: bool) -> torch.Tensor:
    """The top-``rank`` left (m x r) or right (n x r) singular vectors of ``grad`` (SVD in fp32)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return vh[:rank, :].T.contiguous() if right else u[:, :rank].contiguous()


def _check_hyper(*, lr: float, betas: Sequence[float], eps: float, weight_decay: float, rank: Any,
                 update_proj_gap: Any, scale: float) -> None:
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ConfigError(f"galore: {what}")

    need(lr > 0 and math.isfinite(lr), f"lr must be a positive number, got {lr!r}")
    need(len(betas) == 2 and all(0 <= b < 1 for b in betas), f"betas must be two numbers in [0, 1), got {betas!r}")
    need(eps > 0, f"eps must be positive, got {eps!r}")
    need(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay!r}")
    need(isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1,
         f"rank must be an integer >= 1, got {rank!r}")
    need(isinstance(update_proj_gap, int) and not isinstance(update_proj_gap, bool) and update_proj_gap >= 1,
         f"update_proj_gap must be an integer >= 1 (steps between projector refreshes; the paper uses "
         f"50-1000), got {update_proj_gap!r}")
    need(scale > 0 and math.isfinite(scale), f"scale must be a positive number (the paper uses 0.25-2), got {scale!r}")
