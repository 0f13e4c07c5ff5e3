"""DyLoRA: dynamic-rank LoRA (Valipour et al., 2023, https://arxiv.org/abs/2210.07558).

One training run yields a LoRA that works at every rank ``b`` in ``[r_min, r_max]``. The factors
are those of a rank-``r_max`` LoRA, but each training step samples a rank ``b`` and the forward
pass uses only the first ``b`` rows of ``A`` and the first ``b`` columns of ``B`` (the ranks are
*nested*), scaled by ``alpha / b``::

    h = W x + (alpha / b) * B[:, :b] A[:b, :] dropout(x)

By default only the ``b``-th row of ``A`` and the ``b``-th column of ``B`` receive a gradient at
that step (the paper's scheme: lower ranks are already trained and stay put; the first
``r_min`` slices train together when ``b = r_min``); ``update_all=True`` trains all of the first
``b``. After training, :func:`set_rank` picks the rank used for evaluation, merging and saving;
the saved config records it (``rank``), and the file keeps all ``r_max`` slices, so a loaded
adapter can still move to another rank; :func:`truncate` drops the slices beyond the chosen rank
for a smaller file.

The gradient is what is masked: with a momentum optimizer (AdamW) a slice that trained at an
earlier step keeps moving by its optimizer moments for a while, as in the authors' code.

Who samples the rank: the peftlab trainer calls :meth:`DyLoRA.begin_step` before every optimizer
step, which draws ``b`` from the run's seed and the step number alone (no hidden random state),
so runs are reproducible and a resumed run is identical to an uninterrupted one. Other training
loops call :func:`begin_step` themselves; a training forward pass before any step was begun
trains the full ``r_max`` LoRA (every slice). Evaluation mode always uses the chosen rank.

Layers: those of :mod:`peftlab.methods.lora` (``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Embedding``,
``nn.Conv1d/2d/3d``); tensor names are LoRA's (``lora_A``/``lora_B``). peft has no DyLoRA, so
the files are peftlab's own.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from peftlab.core import slots
from peftlab.core.errors import AdapterStateError, ConfigError
from peftlab.core.layer import MergeableLayer
from peftlab.core.method import Method, register
from peftlab.core.targets import ALL_LINEAR
from peftlab.methods._lowrank import (LoRAConvLayer, LoRAEmbeddingLayer, LoRALayer, LoRALinearLayer, attach_layers,
                                      select_layers)

__all__ = ["DyLoRA", "begin_step", "set_rank", "truncate"]


@dataclass(frozen=True)
class RankState:
    """Per layer and adapter: the rank bounds, the chosen rank and this step's sampled rank
    (an immutable record: changes replace it, ``AdapterLayer.set_adapter_state``)."""

    r_min: int
    r_max: int
    alpha: float
    update_all: bool
    rank: int
    """Rank used in evaluation mode and by merging."""
    step_rank: int | None = None
    """Rank sampled for the current training step (None: no step begun yet)."""


def nested(w: torch.Tensor, b: int, dim: int, first: int) -> torch.Tensor:
    """The first ``b`` slices of ``w`` along ``dim``; slices before ``first`` carry no gradient."""
    w = w.narrow(dim, 0, b)
    if first > 0:
        w = torch.cat([w.narrow(dim, 0, first).detach(), w.narrow(dim, first, b - first)], dim)
    return w


class DyLoRALayer(LoRALayer):
    """The LoRA layer kinds with nested-rank factors: each DyLoRA kind is ``(DyLoRALayer, LoRA
    kind)`` and changes only which factors a forward pass and a merge use."""

    owner_method = "dylora"
    class_prefix = "DyLoRA"

    def add_dylora(self, name: str, r_min: int, r_max: int, alpha: float, dropout: float, update_all: bool,
                   rank: int) -> None:
        self.add_adapter(name, r_max, alpha, dropout, False, "default")
        self.set_adapter_state(name, RankState(r_min, r_max, alpha, update_all, rank))

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The first ``b`` slices: ``b`` sampled for this training step (only the ``b``-th slice
        trains unless ``update_all``), else the chosen rank; scale ``alpha / b``."""
        st: RankState = self.adapter_state(name)
        a, bw = self.factor_tensors(name)
        if self.training and st.step_rank is not None:
            b = st.step_rank
            first = 0 if st.update_all or b <= st.r_min else b - 1
            return nested(a, b, 0, first), nested(bw, b, 1, first), st.alpha / b
        return a[:st.rank], bw[:, :st.rank], st.alpha / st.rank

    def merge_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        st: RankState = self.adapter_state(name)
        a, bw = self.factor_tensors(name)
        return a[:st.rank], bw[:, :st.rank], st.alpha / st.rank

    @torch.no_grad()
    def truncate(self, name: str) -> None:
        """Keep only the first ``rank`` slices of adapter ``name`` (r_max becomes rank)."""
        st: RankState = self.adapter_state(name)
        b = st.rank
        for key, p in self.adapter_parameters(name).items():
            a_side = key.split(".", 1)[0] in ("lora_A", "lora_embedding_A")
            kept = nn.Parameter((p[:b] if a_side else p[:, :b]).clone(), requires_grad=p.requires_grad)
            owner_path, _, attr = key.rpartition(".")
            owner = self.get_submodule(owner_path)
            if isinstance(owner, nn.ParameterDict):
                owner[attr] = kept
            else:
                setattr(owner, attr, kept)
                for size in ("out_features", "out_channels") if a_side else ("in_features", "in_channels"):
                    if hasattr(owner, size):
                        setattr(owner, size, b)
        self.set_adapter_state(name, dataclasses.replace(st, r_max=b, r_min=min(st.r_min, b)))


class DyLoRALinearLayer(DyLoRALayer, LoRALinearLayer):
    """DyLoRA on ``nn.Linear`` and GPT-2 ``Conv1D``."""


class DyLoRAEmbeddingLayer(DyLoRALayer, LoRAEmbeddingLayer):
    """DyLoRA on ``nn.Embedding`` (``A`` is ``r_max x num_embeddings``, looked up per token)."""


class DyLoRAConvLayer(DyLoRALayer, LoRAConvLayer):
    """DyLoRA on ``nn.Conv1d/2d/3d``: the first ``b`` output channels of ``A``, input channels of ``B``."""


_KINDS: dict[type[LoRALayer], type[DyLoRALayer]] = {
    LoRALinearLayer: DyLoRALinearLayer, LoRAEmbeddingLayer: DyLoRAEmbeddingLayer, LoRAConvLayer: DyLoRAConvLayer}


@register("dylora")
@dataclass(frozen=True)
class DyLoRA(Method):
    """LoRA trained at every rank ``b`` in ``[r_min, r_max]`` at once; evaluate, merge and save
    at any rank ``<= r_max`` afterwards (:func:`set_rank`). Mergeable; identity at init."""

    r_max: int = 8
    """Largest rank (the size of the factors)."""
    r_min: int = 1
    """Smallest rank sampled in training. With the default slice-wise update the first ``r_min``
    slices train together; ranks below ``r_min`` are not trained on their own."""
    alpha: float = 16
    """The update is scaled by alpha / b at rank b (as LoRA's alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter's input only."""
    target_modules: tuple[str, ...] = (ALL_LINEAR,)
    """Which modules get DyLoRA (see peftlab.core.targets)."""
    exclude_modules: tuple[str, ...] = ()
    layers: tuple[int | str, ...] | None = None
    """Only these transformer-block indices (ints or ranges like '0-5'); None: all."""
    update_all: bool = False
    """False: at a step of rank b only the b-th slice trains (the paper's scheme); True: all of
    the first b slices train."""
    rank: int | None = None
    """Rank used for evaluation, merging and saving (set it after training with
    :func:`set_rank`); None: r_max."""

    mergeable: ClassVar[bool] = True
    suggested_lr: ClassVar[float] = 1e-3

    def __post_init__(self) -> None:
        for field_name in ("r_min", "r_max"):
            v = getattr(self, field_name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"dylora: {field_name} must be a positive integer (got {v!r}); "
                                  "ranks start at 1, e.g. r_min=1, r_max=8")
        if self.r_min > self.r_max:
            raise ConfigError(f"dylora: r_min ({self.r_min}) is larger than r_max ({self.r_max}); "
                              "pick r_min <= r_max, e.g. r_min=1")
        if self.rank is not None and (not isinstance(self.rank, int) or not 1 <= self.rank <= self.r_max):
            raise ConfigError(f"dylora: rank must be None (r_max) or an integer in [1, r_max={self.r_max}] "
                              f"(got {self.rank!r})")
        if self.alpha <= 0:
            raise ConfigError(f"dylora: alpha must be > 0 (got {self.alpha}); a common choice is 2 * r_max")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dylora: dropout must be in [0, 1) (got {self.dropout})")

    @property
    def eval_rank(self) -> int:
        """The rank used outside training steps: ``rank``, or ``r_max`` when unset."""
        return self.r_max if self.rank is None else self.rank

    def attach(self, model: nn.Module, name: str) -> None:
        modules = select_layers(model, "dylora", target_modules=self.target_modules,
                                exclude_modules=self.exclude_modules, layers=self.layers, skip=self.modules_to_save)

        def add(layer: LoRALayer, path: str) -> None:
            assert isinstance(layer, DyLoRALayer)
            layer.add_dylora(name, self.r_min, self.r_max, self.alpha, self.dropout, self.update_all, self.eval_rank)

        attach_layers(modules, lambda path: self.r_max, _KINDS.__getitem__, add)

    def sample_rank(self, step: int, seed: int) -> int:
        """The rank of training step ``step`` in a run seeded ``seed``: uniform on
        ``[r_min, r_max]``, a function of its arguments only."""
        return random.Random(f"dylora:{seed}:{step}").randint(self.r_min, self.r_max)

    def begin_step(self, model: nn.Module, name: str, step: int, seed: int) -> None:
        b = self.sample_rank(step, seed)
        for _, layer in self.adapted_layers(model, name):
            layer.set_adapter_state(name, dataclasses.replace(layer.adapter_state(name), step_rank=b))


def begin_step(model: nn.Module, step: int, seed: int = 0, name: str = "default") -> int:
    """Sample the rank of training step ``step`` for DyLoRA adapter ``name`` and return it.

    The peftlab trainer does this itself; call it at the start of every step of another
    training loop (e.g. from a ``transformers.TrainerCallback.on_step_begin``).
    """
    method = _dylora(model, name)
    method.begin_step(model, name, step, seed)
    return method.sample_rank(step, seed)


def set_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Use DyLoRA adapter ``name`` at ``rank`` (``1 <= rank <= r_max``) from now on: for
    evaluation, merging (a merged adapter is re-merged at the new rank) and saving (the saved
    config records it). Nothing changes on bad input."""
    method = _dylora(model, name)
    new = dataclasses.replace(method, rank=rank)  # validates the rank
    layers = [layer for _, layer in method.adapted_layers(model, name)]
    merged = [layer for layer in layers if name in getattr(layer, "peftlab_merged", ())]
    for layer in merged:
        assert isinstance(layer, MergeableLayer)
        layer.unmerge_adapter(name)
    for layer in layers:
        layer.set_adapter_state(name, dataclasses.replace(layer.adapter_state(name), rank=new.eval_rank))
    slots.slot(model, name).method = new
    for layer in merged:
        layer.merge_adapter(name)


def truncate(model: nn.Module, name: str = "default") -> None:
    """Drop the slices of DyLoRA adapter ``name`` beyond its chosen rank, for good: ``r_max``
    becomes that rank, so the saved file is a rank-``rank`` adapter (smaller) and higher ranks
    are gone. Parameters are replaced: build a new optimizer before training further."""
    method = _dylora(model, name)
    b = method.eval_rank
    layers = [layer for _, layer in method.adapted_layers(model, name)]
    if any(name in getattr(layer, "peftlab_merged", ()) for layer in layers):
        raise AdapterStateError(f"adapter {name!r} is merged; peftlab.unmerge the model before truncating it")
    for layer in layers:
        layer.truncate(name)  # type: ignore[attr-defined]
    slots.slot(model, name).method = dataclasses.replace(method, r_max=b, r_min=min(method.r_min, b), rank=None)


def _dylora(model: nn.Module, name: str) -> DyLoRA:
    method = slots.slot(model, name).method
    if not isinstance(method, DyLoRA):
        raise ConfigError(f"adapter {name!r} is {method.method_name!r}, not dylora")
    return method
