"""AdaLoRA: adaptive budget allocation (Zhang et al., 2023, https://arxiv.org/abs/2303.10512).

Each adapted weight ``W`` (``d_out x d_in``) gets an update in SVD form::

    h = W x + s * P diag(E) Q dropout(x),   Q: r x d_in (lora_A),  E: r x 1 (lora_E),
                                            P: d_out x r (lora_B),  s = alpha / (init_r + 1e-5)

(peft's tensor names and scale: ``ranknum`` is ``init_r`` for good, even after pruning). ``E``
starts at zero, so the model equals the base at initialisation; ``P`` and ``Q`` start ``N(0, 0.02)``.
During training the *rank budget* (the number of triplets ``(P_i, E_i, Q_i)`` kept over all
layers) falls from ``init_r`` per layer to ``target_r`` per layer: each triplet's importance is

    score_i = S(E_i) + mean_j S(Q_ij) + mean_j S(P_ji),    S(w) = EMA_beta1(I(w)) * EMA_beta2(|I(w) - EMA_beta1(I(w))|)

with the sensitivity ``I(w) = |w * dL/dw|`` (smoothed by ``beta1``; the second factor is its
uncertainty, smoothed by ``beta2``), and every ``delta_t`` steps of the budgeting phase the triplets
whose score is at or below the budget's threshold (one threshold over all layers) get ``E_i = 0``.
The budget follows peft's cubic schedule: ``init`` up to ``tinit``, then
``int((init - target) * (1 - (t - tinit) / (total_step - tfinal - tinit))^3 + target)``, and at
step ``total_step - tfinal`` the final allocation to ``target_r * layers``, kept (``E`` re-masked
after every step) until the end. The loss gets peft's orthogonality penalty,
``orth_reg_weight * mean over P and Q of ||P^T P - I||_F`` and ``||Q Q^T - I||_F`` (peft's
Frobenius norm, not its square as in the paper's Eq. 4, so that training follows peft's).

Who runs the allocation: :meth:`AdaLoRA.end_step` (the peftlab trainer calls it after each
optimizer step, before the gradients are cleared; peft's ``update_and_allocate(global_step)``
with the same 0-based step) and :meth:`AdaLoRA.extra_loss` (the penalty; the trainer adds it to
every micro-batch's loss). Other loops call both themselves. The EMA scores and the current mask
are buffers of the layer (``adalora_state``), :meth:`AdaLoRA.training_state` names them for
checkpoints, so a resumed run can continue exactly.

Files are peft's: ``lora_A``/``lora_E``/``lora_B`` per module, pruned to the kept triplets, and
``rank_pattern`` (``{"<module>.lora_E": [kept, ...]}``, ``init_r`` entries each) in
adapter_config.json; attaching with a ``rank_pattern`` builds each layer at its kept rank, as
peft's loading resizes its layers. Layers: ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Conv2d``
(peft's three). Mergeable.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import Method, register
from peftlab.core.targets import ALL_LINEAR, select, peft_targets
from peftlab.methods._lowrank import LowRankForm
from peftlab.methods.lora import check_rank

__all__ = ["AdaLoRA", "AdaLoRALayer", "budget_schedule"]

EPS = 1e-5
"""peft divides by ``ranknum + 1e-5``."""
INITS = ("default", "random")


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters of a half-precision base keep fp32 factors (stable optimizer updates)."""
    half = weight.dtype in (torch.float16, torch.bfloat16) or not weight.is_floating_point()
    return torch.float32 if half else weight.dtype


@dataclass(frozen=True)
class LayerState:
    """Non-tensor state of one adapter on one layer."""

    init_r: int
    scale: float
    """alpha / (init_r + 1e-5)."""
    origin: tuple[bool, ...] | None
    """Which of the ``init_r`` triplets this layer holds (from an attach with ``rank_pattern``);
    None: all of them."""


class _Scores(nn.Module):
    """EMA sensitivity (``ipt_*``) and uncertainty (``unc_*``) of ``A``, ``E`` and ``B``, plus the
    mask of the last allocation (``mask``: kept triplets). Buffers, so they follow the model
    (``.to``) and sit in its ``state_dict``; they are training state, not part of adapter files."""

    def __init__(self, r: int, d_in: int, d_out: int, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        for side, shape in (("A", (r, d_in)), ("E", (r, 1)), ("B", (d_out, r))):
            for kind in ("ipt", "unc"):
                self.register_buffer(f"{kind}_{side}", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("mask", torch.ones(r, device=device, dtype=torch.bool))


class AdaLoRALayer(MergeableLayer):
    """AdaLoRA on ``nn.Linear``, GPT-2 ``Conv1D`` (weight ``d_in x d_out``) and ``nn.Conv2d``
    (``Q`` is ``r x (in * kh * kw)``: a convolution to ``r`` channels, ``P`` a 1x1 one back)."""

    owner_method = "adalora"
    class_prefix = "AdaLoRA"
    adapter_containers = ("lora_A", "lora_E", "lora_B", "lora_dropout", "adalora_state")
    parameter_containers = ("lora_A", "lora_E", "lora_B")

    def _dims(self) -> tuple[int, int]:
        """(d_in of Q, d_out of P)."""
        if isinstance(self, nn.Conv2d):
            return self.in_channels * math.prod(self.kernel_size), self.out_channels
        if isinstance(self, nn.Linear):
            return self.in_features, self.out_features
        return int(self.weight.shape[0]), int(self.weight.shape[1])  # Conv1D: (d_in, d_out)

    def add_adapter(self, name: str, init_r: int, origin: tuple[bool, ...] | None, alpha: float, dropout: float,
                    init: str) -> None:
        r = init_r if origin is None else sum(origin)
        d_in, d_out = self._dims()
        kw = {"device": self.weight.device, "dtype": _adapter_dtype(self.weight)}
        a, e, b = torch.empty(r, d_in, **kw), torch.empty(r, 1, **kw), torch.empty(d_out, r, **kw)
        if a.device.type != "meta":
            with torch.no_grad():
                if init == "default":  # peft: E zero (identity at init), P and Q N(0, 0.02)
                    e.zero_()
                    a.normal_(0.0, 0.02)
                    b.normal_(0.0, 0.02)
                else:  # peft's init_lora_weights=False: all standard normal
                    a.normal_()
                    e.normal_()
                    b.normal_()
        self.lora_A[name], self.lora_E[name], self.lora_B[name] = nn.Parameter(a), nn.Parameter(e), nn.Parameter(b)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.adalora_state[name] = _Scores(r, d_in, d_out, kw["device"], kw["dtype"])
        self.set_adapter_state(name, LayerState(init_r, alpha / (init_r + EPS), origin))

    def held_rank(self, name: str) -> int:
        return int(self.lora_A[name].shape[0])

    # ------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        out = super().forward(x, *args, **kwargs)
        routing = self.__dict__.get("peftlab_routing")
        if routing is not None:
            return routing.apply(self, out, x=x)
        for name in self.live_adapters():
            if self.held_rank(name):
                out = out + self.update_output(name, x).to(out.dtype)
        return out

    def route_refusal(self, name: str) -> str | None:
        return "AdaLoRA on Conv2d has no per-row form" if isinstance(self, nn.Conv2d) else None

    @torch.no_grad()
    def routed_form(self, name: str) -> LowRankForm | None:
        """``P diag(s E) Q``: a low-rank form with a per-rank scale (None where all is pruned)."""
        if not self.held_rank(name):
            return None
        e = self.lora_E[name].reshape(-1) * self.adapter_state(name).scale
        return LowRankForm(self.lora_A[name], self.lora_B[name], e)

    def update_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``s * P diag(E) Q x``, factored: the scale and ``E`` multiply the r-wide intermediate
        (peft scales the d_out-wide output twice), and no ``d_out x d_in`` matrix is formed."""
        a, b, e = self.lora_A[name], self.lora_B[name], self.lora_E[name]
        scale = self.adapter_state(name).scale
        xd = self.lora_dropout[name](x.to(a.dtype))
        if isinstance(self, nn.Conv2d):
            h = F.conv2d(xd, a.view(a.shape[0], self.in_channels, *self.kernel_size), None, self.stride,
                         self.padding, self.dilation)
            return F.conv2d((h * e.view(1, -1, 1, 1)) * scale, b.view(*b.shape, 1, 1))
        return F.linear((F.linear(xd, a) * e.view(-1)) * scale, b)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, e, b = (getattr(self, c)[name].float() for c in ("lora_A", "lora_E", "lora_B"))
        delta = (b @ (a * e)) * self.adapter_state(name).scale
        if isinstance(self, nn.Conv2d):
            return delta.reshape(self.weight.shape)
        return delta if isinstance(self, nn.Linear) else delta.T

    # ------------------------------------------------------------------------ files
    def adapter_file_tensors(self, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        """``lora_A``/``lora_E``/``lora_B`` only (the scores are training state), pruned to the
        kept triplets of the last allocation, as peft saves them."""
        keep = self.kept(name)
        out = {}
        for c in ("lora_A", "lora_E", "lora_B"):
            t = getattr(self, c)[name]
            if keep is not None:
                t = t.detach().index_select(1 if c == "lora_B" else 0, keep)
            out[f"{c}.{name}"] = (c, t)
        return out

    def kept(self, name: str) -> torch.Tensor | None:
        """Indices of the triplets the last allocation kept, or None when it kept all (or on meta)."""
        mask = self.adalora_state[name].mask
        if mask.device.type == "meta" or bool(mask.all()):
            return None
        return mask.nonzero().view(-1)

    def pattern(self, name: str, mask: list[bool]) -> list[bool]:
        """The ``init_r``-long pattern of kept triplets: ``mask`` (over the held ones) put in place."""
        origin = self.adapter_state(name).origin
        if origin is None:
            return list(mask)
        it = iter(mask)
        return [bool(next(it)) if held else False for held in origin]

    def summary_columns(self) -> dict[str, str]:
        """The kept rank of each AdaLoRA adapter, ``kept/init_r`` (``peftlab.summary``'s table)."""
        cells = []
        for name in self.adapter_names():
            kept = int(self.adalora_state[name].mask.sum()) if self.weight.device.type != "meta" else \
                self.held_rank(name)
            cells.append(f"{kept}/{self.adapter_state(name).init_r}")
        names = self.adapter_names()
        return {"adalora rank": cells[0] if len(names) == 1 else " ".join(f"{n}={c}" for n, c in zip(names, cells))}


def budget_schedule(step: int, init_bgt: int, target_bgt: int, tinit: int, tfinal: int, total_step: int,
                    delta_t: int) -> tuple[int, bool]:
    """peft's budget at 0-based ``step`` and whether to mask at it: ``init_bgt`` up to ``tinit``,
    the cubic decrease to ``target_bgt`` until ``total_step - tfinal`` (masking every
    ``delta_t`` steps), ``target_bgt`` after."""
    if step <= tinit:
        return init_bgt, False
    if step > total_step - tfinal:
        return target_bgt, True
    left = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((init_bgt - target_bgt) * (left ** 3) + target_bgt), step % delta_t == 0


@register("adalora")
@dataclass(frozen=True)
class AdaLoRA(Method):
    """SVD-form low-rank updates whose ranks are allocated by importance during training.
    Mergeable; identity at init; the final ranks are saved (``rank_pattern``)."""

    init_r: int = 12
    """Rank each layer starts with (peft's default); the budget starts at init_r per layer."""
    target_r: int = 8
    """Average rank per layer after allocation: the final budget is target_r x layers (peft's default)."""
    total_step: int = 40
    """Optimizer steps of the run (peft requires it; set it to your run's steps). The default is
    the lab bench's default run, so that its AdaLoRA row has allocated its ranks."""
    tinit: int = 0
    """Steps of full-rank warm-up before the budget falls."""
    tfinal: int = 0
    """Steps at the final ranks after the budgeting phase."""
    delta_t: int = 1
    """Steps between two allocations in the budgeting phase (peft's deltaT)."""
    beta1: float = 0.85
    """EMA of the sensitivity |w * grad| (peft's and the paper's default)."""
    beta2: float = 0.85
    """EMA of its uncertainty."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality penalty on P and Q (0: none)."""
    alpha: float = 8
    """Update scale alpha / init_r (peft's lora_alpha, default 8)."""
    dropout: float = 0.0
    """Dropout on the adapter's input only."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules get AdaLoRA (see peftlab.core.targets): every linear layer but the output head."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    init: str = "default"
    """'default' (E zero: identity at init; P, Q ~ N(0, 0.02)) or 'random' (all N(0, 1), peft's
    init_lora_weights=False; not identity at init)."""
    rank_pattern: dict[str, tuple[bool, ...]] | None = None
    """The saved allocation: {'<module path>.lora_E': init_r flags, True where the triplet is kept};
    layers are built at their kept rank. Written by training (end_step) and read from files."""

    peft_type: ClassVar[str | None] = "ADALORA"
    peft_peer_untrainable: ClassVar[str] = (
        "peft's AdaLoRA allocates ranks only when the training loop calls its update_and_allocate after every "
        "step (and adds its orthogonality penalty only with a task type); benchmarks/adalora_vs_peft.py "
        "compares the two with both hooks called")
    mergeable: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 1e-3
    typical_score: ClassVar[float | None] = 1.015
    typical_score_source: ClassVar[str] = ("Zhang et al. 2023 (AdaLoRA), Table 1: DeBERTaV3-base GLUE average "
                                           "89.46 (1.27M parameters) vs 88.09 for full fine-tuning")
    fsdp_compatible: ClassVar[bool] = False
    fsdp_reason: ClassVar[str] = ("AdaLoRA ranks the triplets of every layer against one threshold and masks "
                                  "whole rows of E, which needs whole tensors on every rank")

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(f"adalora: {message}")

        need(self.init_r >= 1, f"init_r must be a positive integer (got {self.init_r}); peft's default is 12")
        need(0 <= self.target_r <= self.init_r, f"target_r must be in [0, init_r={self.init_r}] (got "
             f"{self.target_r}): the budget only falls; e.g. init_r=12, target_r=8")
        need(self.total_step >= 1, f"total_step must be a positive integer, the run's optimizer steps "
             f"(got {self.total_step})")
        need(self.tinit >= 0 and self.tfinal >= 0, f"tinit and tfinal must be >= 0 (got {self.tinit}, {self.tfinal})")
        need(self.tinit < self.total_step - self.tfinal,
             f"tinit ({self.tinit}) must be below total_step - tfinal ({self.total_step} - {self.tfinal}) to leave a "
             "budgeting phase; lower tinit/tfinal or raise total_step")
        need(self.delta_t >= 1, f"delta_t must be a positive integer (got {self.delta_t})")
        for label, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            need(0 < beta < 1, f"{label} must be in (0, 1) (got {beta}); peft's default is 0.85")
        need(self.orth_reg_weight >= 0, f"orth_reg_weight must be >= 0 (got {self.orth_reg_weight})")
        need(self.alpha > 0, f"alpha must be > 0 (got {self.alpha}); peft's default is 8")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1) (got {self.dropout})")
        need(self.init in INITS, f"init must be one of {INITS} (got {self.init!r})")
        for key, flags in (self.rank_pattern or {}).items():
            need(key.endswith(".lora_E") or ".lora_E." in key,
                 f"rank_pattern key {key!r} must name a module's lora_E ('<module path>.lora_E'), as peft writes it")
            need(len(flags) == self.init_r, f"rank_pattern[{key!r}] has {len(flags)} entries; it needs one per "
                 f"initial triplet (init_r={self.init_r})")

    # ------------------------------------------------------------------------ attach
    def _patterns(self, paths: list[str]) -> dict[str, tuple[bool, ...]]:
        """rank_pattern by module path (peft's keys: '<path>.lora_E', or with '.<adapter>' after it)."""
        out: dict[str, tuple[bool, ...]] = {}
        for key, flags in (self.rank_pattern or {}).items():
            out[re.sub(r"\.lora_E(\.[^.]+)?$", "", key)] = tuple(flags)
        unknown = sorted(set(out) - set(paths))
        if unknown:
            raise ConfigError(f"adalora: rank_pattern names modules that are not adapted: {unknown[:5]}; its keys "
                              "must be '<module path>.lora_E' of the target modules (was the adapter saved from "
                              "another model?)")
        return out

    def attach(self, model: nn.Module, name: str) -> None:
        paths = select(model, self.target_modules, exclude=self.exclude_modules, layers=self.layers,
                       supported=(nn.Linear, nn.Conv2d), supported_names=("Conv1D",), skip=self.modules_to_save,
                       what="adalora")
        modules = {p: model.get_submodule(p) for p in paths}
        for path, module in modules.items():  # every check before any change
            check_rank(module, self.init_r, path)
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ConfigError(f"adalora: {path} is a grouped or non-zero-padded convolution, which AdaLoRA does "
                                  "not support (as peft); exclude it with exclude_modules")
        patterns = self._patterns(paths)
        for path, module in modules.items():
            layer = AdaLoRALayer.adopt(module)
            assert isinstance(layer, AdaLoRALayer)
            layer.add_adapter(name, self.init_r, patterns.get(path), self.alpha, self.dropout, self.init)

    def layers_of(self, model: nn.Module, name: str) -> list[tuple[str, AdaLoRALayer]]:
        return [(p, layer) for p, layer in self.adapted_layers(model, name) if isinstance(layer, AdaLoRALayer)]

    # ------------------------------------------------------------------------ training hooks
    def extra_loss(self, model: nn.Module, name: str) -> torch.Tensor | None:
        """peft's orthogonality penalty: ``orth_reg_weight * mean(||Q Q^T - I||_F, ||P^T P - I||_F)``
        over every P and Q of the adapter."""
        if self.orth_reg_weight == 0:
            return None
        terms = []
        for _, layer in self.layers_of(model, name):
            a, b = layer.lora_A[name], layer.lora_B[name]
            for cov in (a @ a.T, b.T @ b):
                eye = torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)
                terms.append(torch.linalg.matrix_norm(cov - eye))
        if not terms:
            return None
        return self.orth_reg_weight * (torch.stack(terms).sum() / len(terms))

    def training_state(self, model: nn.Module, name: str) -> dict[str, torch.Tensor]:
        """The EMA scores and the allocation mask of every layer (``state_dict`` keys)."""
        out = {}
        for path, layer in self.layers_of(model, name):
            for key, t in layer.adalora_state[name].state_dict(keep_vars=True).items():
                out[f"{path}.adalora_state.{name}.{key}"] = t
        return out

    @torch.no_grad()
    def update_scores(self, layers: list[tuple[str, AdaLoRALayer]], name: str) -> None:
        """EMA of the sensitivity ``|w * grad|`` (beta1) and of its uncertainty (beta2), peft's
        ``update_ipt`` with the same operations in the same order (a missing gradient counts as 0),
        batched over all layers (``torch._foreach_*``)."""
        params, grads, ipt, unc = [], [], [], []
        for _, layer in layers:
            st = layer.adalora_state[name]
            for side, c in (("A", "lora_A"), ("E", "lora_E"), ("B", "lora_B")):
                p = getattr(layer, c)[name]
                params.append(p.detach())
                grads.append(p.grad if p.grad is not None else torch.zeros_like(p))
                ipt.append(getattr(st, f"ipt_{side}"))
                unc.append(getattr(st, f"unc_{side}"))
        if not params:
            return
        # in place where peft allocates: each product is rounded before its sum, as in peft's expressions
        now = torch._foreach_mul(params, grads)  # I = |w * g|
        torch._foreach_abs_(now)
        part = torch._foreach_mul(now, 1 - self.beta1)
        torch._foreach_mul_(ipt, self.beta1)
        torch._foreach_add_(ipt, part)  # Ibar = beta1 * Ibar + (1 - beta1) * I
        torch._foreach_sub_(now, ipt)
        torch._foreach_abs_(now)
        torch._foreach_mul_(now, 1 - self.beta2)
        torch._foreach_mul_(unc, self.beta2)
        torch._foreach_add_(unc, now)  # U = beta2 * U + (1 - beta2) * |I - Ibar|

    @staticmethod
    def triplet_scores(layers: list[tuple[str, AdaLoRALayer]], name: str) -> list[torch.Tensor]:
        """Per layer, the importance of each held triplet: ``S(E_i) + (mean_j S(Q_ij) + mean_j S(P_ji))``."""
        out = []
        for _, layer in layers:
            st = layer.adalora_state[name]
            s_a = torch.mean(st.ipt_A * st.unc_A, dim=1, keepdim=True)
            s_b = torch.mean(st.ipt_B * st.unc_B, dim=0, keepdim=False).view(-1, 1)
            s_ab = torch.cat([s_a, s_b], dim=1).sum(dim=1, keepdim=False)
            out.append((st.ipt_E * st.unc_E).view(-1) + s_ab.view(-1))
        return out

    @torch.no_grad()
    def mask_to_budget(self, layers: list[tuple[str, AdaLoRALayer]], name: str, budget: int) -> None:
        """Zero ``E`` of the triplets scoring at or below the ``(init - budget)``-th smallest score
        over all layers (peft's rule, ties included) and record the mask."""
        scores = self.triplet_scores(layers, name)
        init_bgt = sum(layer.held_rank(name) for _, layer in layers)
        drop = init_bgt - budget
        if drop <= 0 or not layers:  # nothing to prune (peft's kthvalue would fail at k = 0)
            return
        threshold = torch.kthvalue(torch.cat(scores), k=drop).values
        for (_, layer), score in zip(layers, scores):
            keep = score > threshold
            layer.lora_E[name].masked_fill_(~keep.view(-1, 1), 0.0)
            layer.adalora_state[name].mask.copy_(keep)

    @staticmethod
    @torch.no_grad()
    def apply_mask(layers: list[tuple[str, AdaLoRALayer]], name: str) -> None:
        """Re-zero the pruned triplets' ``E`` (peft's ``mask_using_rank_pattern``, each final step)."""
        for _, layer in layers:
            layer.lora_E[name].masked_fill_(~layer.adalora_state[name].mask.view(-1, 1), 0.0)

    def end_step(self, model: nn.Module, name: str, step: int, seed: int) -> None:
        """peft's ``update_and_allocate(step)``: scores from this step's gradients, and the budget's
        mask at allocation steps; the final allocation at ``total_step - tfinal``, then its mask
        after every step."""
        final = self.total_step - self.tfinal
        layers = self.layers_of(model, name)
        init_bgt, target_bgt = sum(layer.held_rank(name) for _, layer in layers), self.target_r * len(layers)
        if step < final:
            self.update_scores(layers, name)
            budget, now = budget_schedule(step, init_bgt, target_bgt, self.tinit, self.tfinal, self.total_step,
                                          self.delta_t)
            if now:
                self.mask_to_budget(layers, name, budget)
                sync_rank_pattern(model, name, layers)
        elif step == final:
            self.mask_to_budget(layers, name, target_bgt)
            sync_rank_pattern(model, name, layers)
        else:
            self.apply_mask(layers, name)

    def ranks(self, model: nn.Module, name: str) -> dict[str, tuple[int, int]]:
        """``{module path: (kept triplets, init_r)}`` after the last allocation."""
        out = {}
        for path, layer in self.layers_of(model, name):
            mask = layer.adalora_state[name].mask
            kept = layer.held_rank(name) if mask.device.type == "meta" else int(mask.sum())
            out[path] = (kept, layer.adapter_state(name).init_r)
        return out

    def describe(self, model: nn.Module, name: str) -> list[str]:
        ranks = self.ranks(model, name)
        if not ranks:
            return []
        kept = sum(k for k, _ in ranks.values())
        counts = sorted({k for k, _ in ranks.values()})
        spread = f"ranks {counts[0]}..{counts[-1]}" if len(counts) > 1 else f"rank {counts[0]} everywhere"
        by_kind: dict[str, list[int]] = {}
        for path, (k, _) in ranks.items():
            by_kind.setdefault(path.rpartition(".")[2], []).append(k)
        means = ", ".join(f"{kind} {sum(v) / len(v):.1f}" for kind, v in by_kind.items())
        return [f"adalora {name!r}: rank allocation {kept} of {sum(r for _, r in ranks.values())} triplets kept "
                f"over {len(ranks)} layers (target {self.target_r * len(ranks)}: target_r {self.target_r} x "
                f"{len(ranks)}), {spread}; per module in the table's 'adalora rank' column",
                f"adalora {name!r}: mean kept rank by module name: {means}"]

    # ------------------------------------------------------------------------ files
    def file_tensors(self, model: nn.Module, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        sync_rank_pattern(model, name)  # the saved config and header options carry the current allocation
        return super().file_tensors(model, name)

    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        plain = all(not any(ch in t for ch in "*?[:") and t != ALL_LINEAR for t in self.target_modules)
        if (plain and not self.exclude_modules and self.layers is None) or model is None:
            targets = list(self.target_modules)
        else:  # peft cannot express globs, types or layer ranges: the exact module list
            targets = [p for p, _ in self.layers_of(model, name)]
        conv1d = model is not None and any(not isinstance(layer, (nn.Linear, nn.Conv2d))
                                           for _, layer in self.layers_of(model, name))
        return {
            "peft_type": "ADALORA", "task_type": None, "r": 8, "target_modules": targets, "exclude_modules": None,
            "lora_alpha": self.alpha, "lora_dropout": self.dropout, "fan_in_fan_out": conv1d, "bias": "none",
            "use_rslora": False, "modules_to_save": list(self.modules_to_save) or None,
            "init_lora_weights": self.init == "default", "layers_to_transform": None, "layers_pattern": None,
            "rank_pattern": {k: list(v) for k, v in self.rank_pattern.items()} if self.rank_pattern else None,
            "alpha_pattern": {}, "megatron_config": None, "megatron_core": "megatron.core",
            "trainable_token_indices": None, "loftq_config": {}, "eva_config": None, "corda_config": None,
            "lora_ga_config": None, "use_dora": False, "velora_config": None, "alora_invocation_tokens": None,
            "use_qalora": False, "qalora_group_size": 16, "monteclora_config": None, "layer_replication": None,
            "lora_bias": False, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
            "kasa_config": None, "ensure_weight_tying": False,
            "target_r": self.target_r, "init_r": self.init_r, "tinit": self.tinit, "tfinal": self.tfinal,
            "deltaT": self.delta_t, "beta1": self.beta1, "beta2": self.beta2,
            "orth_reg_weight": self.orth_reg_weight, "total_step": self.total_step, "inference_mode": True,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AdaLoRA:
        unsupported = {k: v for k, v in config.items() if k not in PEFT_HANDLED and k not in PEFT_METADATA
                       and k not in PEFT_IGNORED and not k.startswith("peftlab") and v not in (None, False, {}, [], "")}
        if config.get("bias", "none") != "none":
            unsupported["bias"] = config["bias"]
        if unsupported:
            raise ConfigError(f"this peft AdaLoRA config uses options peftlab's AdaLoRA does not implement: "
                              f"{unsupported}; it was not loaded (its outputs would differ from peft's)")
        ignored = {k: config[k] for k, default in (("r", 8), ("use_rslora", False), ("alpha_pattern", {}))
                   if config.get(k, default) not in (default, None)}
        if ignored:
            import warnings

            warnings.warn(f"peft's AdaLoRA ignores {ignored} (every layer starts at init_r, scaled by lora_alpha / "
                          "init_r); so does peftlab", UserWarning, stacklevel=3)
        init = config.get("init_lora_weights", True)
        if init not in (True, False):
            raise ConfigError(f"this peft AdaLoRA config has init_lora_weights={init!r}; peftlab's AdaLoRA reads "
                              "true or false only; it was not loaded")

        layers = config.get("layers_to_transform")
        pattern = config.get("rank_pattern")
        return cls(
            init_r=config.get("init_r", 12), target_r=config.get("target_r", 8),
            total_step=config.get("total_step") if config.get("total_step") is not None else 0,
            tinit=config.get("tinit", 0), tfinal=config.get("tfinal", 0), delta_t=config.get("deltaT", 1),
            beta1=config.get("beta1", 0.85), beta2=config.get("beta2", 0.85),
            orth_reg_weight=config.get("orth_reg_weight", 0.5), alpha=config.get("lora_alpha", 8),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=peft_targets(config.get("target_modules")) or (ALL_LINEAR,),
            exclude_modules=peft_targets(config.get("exclude_modules")),
            layers=None if layers is None else tuple(layers) if isinstance(layers, list) else (layers,),
            init="default" if init else "random",
            rank_pattern=None if pattern is None else {k: tuple(v) for k, v in pattern.items()},
            modules_to_save=tuple(config.get("modules_to_save") or ()),
        )


PEFT_HANDLED = frozenset({"target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out",
                          "bias", "modules_to_save", "init_lora_weights", "layers_to_transform", "rank_pattern",
                          "target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                          "total_step"})
"""Fields of peft's AdaLoraConfig that peftlab's AdaLoRA reads (fan_in_fan_out: Conv1D is found by type)."""
PEFT_IGNORED = frozenset({"r", "use_rslora", "alpha_pattern"})
"""LoraConfig fields peft's AdaLoRA ignores (it builds every layer at init_r, scaled by lora_alpha)."""
PEFT_METADATA = frozenset({"peft_type", "task_type", "inference_mode", "base_model_name_or_path", "revision",
                           "peft_version", "auto_mapping", "megatron_core", "qalora_group_size"})
"""Fields that describe the file, not the adapter's maths."""


def sync_rank_pattern(model: nn.Module, name: str, layers: list[tuple[str, AdaLoRALayer]] | None = None) -> None:
    """Make adapter ``name``'s method carry its layers' current allocation as ``rank_pattern`` (so the
    saved config, the file header and ``peftlab.adapters(model)`` show it). A no-op until some
    triplet is pruned."""
    s = slots.slot(model, name)
    method = s.method
    if not isinstance(method, AdaLoRA):
        return
    layers = method.layers_of(model, name) if layers is None else layers
    if not layers or any(layer.adalora_state[name].mask.device.type == "meta" for _, layer in layers):
        return
    flags = torch.cat([layer.adalora_state[name].mask for _, layer in layers]).tolist()
    if all(flags):
        return
    pattern, at = {}, 0
    for path, layer in layers:
        held = layer.held_rank(name)
        pattern[f"{path}.lora_E"] = tuple(layer.pattern(name, flags[at:at + held]))
        at += held
    if pattern != method.rank_pattern:
        s.method = dataclasses.replace(method, rank_pattern=pattern)
