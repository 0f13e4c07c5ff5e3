"""BitFit: train only the bias terms (Ben Zaken et al., 2022, https://arxiv.org/abs/2106.10199).

The paper fine-tunes BERT by updating only the biases (about 0.08% of the parameters) and
matches full fine-tuning on many GLUE tasks; updating only the query and the intermediate
(feed-forward) biases is nearly as good. Biases are trained *in place*, and peftlab keeps a copy
of the originals, so ``peftlab.disabled`` and ``peftlab.detach`` give back the base model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from peftlab.core import slots
from peftlab.core.errors import ConfigError
from peftlab.core.method import Method, register
from peftlab.core.targets import select


def bias_keys(model: nn.Module, paths: list[str] | None = None) -> list[str]:
    """``state_dict`` keys of the bias parameters of ``paths`` (of every module when None)."""
    modules = model.named_modules() if paths is None else ((p, model.get_submodule(p)) for p in paths)
    return [f"{p}.bias" if p else "bias" for p, m in modules
            if isinstance(getattr(m, "bias", None), nn.Parameter) and "bias" in m._parameters]


@register("bitfit")
@dataclass(frozen=True)
class BitFit(Method):
    """Bias-only fine-tuning. Identity at init; nothing to merge (biases change in place)."""

    target_modules: tuple[str, ...] = ()
    """Modules whose biases train (peftlab.core.targets entries); empty: every bias. The paper's
    subset for BERT is ('query', 'intermediate.dense')."""

    mergeable: ClassVar[bool] = True  # the update already lives in the base biases
    typical_score: ClassVar[float | None] = 0.99
    typical_score_source: ClassVar[str] = ("Ben Zaken et al. 2022 (BitFit), Table 1: BERT-large on GLUE within "
                                           "about one point of full fine-tuning")

    def attach(self, model: nn.Module, name: str) -> None:
        paths = None
        if self.target_modules:
            paths = [p for p in select(model, self.target_modules, skip=self.modules_to_save, what="bitfit")
                     if bias_keys(model, [p])]
            if not paths:
                raise ConfigError(f"bitfit: the modules selected by {list(self.target_modules)} have no bias")
        keys = bias_keys(model, paths)
        copies = tuple(self.modules_to_save)
        keys = [k for k in keys if "peftlab_copy" not in k.split(".")
                and not any(k.startswith(f"{c}.") or f".{c}." in f".{k}" for c in copies)]
        if not keys:
            mt = getattr(getattr(model, "config", None), "model_type", None)
            raise ConfigError(f"bitfit: {type(model).__name__}"
                              f"{f' (model_type {mt!r})' if mt else ''} has no bias parameters in the selected "
                              "modules (many current architectures are built without biases); BitFit needs them. "
                              "Use LoRA (peftlab.get_method('lora')) instead, or target modules that have biases.")
        slots.train_base_tensors(model, name, keys)
