"""Train a peftlab-adapted model with ``transformers.Trainer`` (or TRL's ``SFTTrainer``) and save
only the adapter.

The Trainer trains every parameter with ``requires_grad``, so an adapted model trains as it is.
What it does not know is how to save one: ``save_model`` would write the whole base model. The
:class:`AdapterSaveMixin` changes only saving and loading:

* ``save_model`` / every checkpoint writes the adapter with :func:`peftlab.save`:
  ``adapter_config.json`` + ``adapter_model.safetensors`` (read by :func:`peftlab.load` and by
  peft's ``PeftModel.from_pretrained``), plus the tokenizer when the trainer has one; no
  ``model.safetensors``.
* Checkpoints (``checkpoint-<step>/``) also hold ``peftlab_trainable.safetensors``, the trainable
  tensors themselves (prompt encoders and prefixes save a derived form in the adapter file), so
  ``trainer.train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` restore them
  exactly.

Example:
    >>> from transformers import Trainer, TrainingArguments
    >>> from peftlab.integrations.hf import PeftlabTrainer, adapter_trainer
    >>> peftlab.attach(model, "lora", r=8, target_modules=["q_proj", "v_proj"])
    >>> trainer = PeftlabTrainer(model=model, args=TrainingArguments("out"), train_dataset=ds)
    >>> trainer.train(); trainer.save_model("out/final")      # adapter files only
    >>> SFT = adapter_trainer(trl.SFTTrainer)                  # the same for any Trainer subclass

Under ``torchrun``/``accelerate launch`` the Trainer runs DDP itself (rank 0 saves). Under
DeepSpeed ZeRO-3 the trainable tensors are gathered with ``deepspeed.zero.GatheredParameters``
before saving.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["TRAINABLE_FILE", "AdapterSaveMixin", "PeftlabTrainer", "adapter_trainer"]

TRAINABLE_FILE = "peftlab_trainable.safetensors"
"""The trainable tensors by ``state_dict`` key, in every checkpoint folder (for resuming)."""

T = TypeVar("T", bound=type)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


class AdapterSaveMixin:
    """Mix into a ``transformers.Trainer`` subclass (before it) to save adapters, not models.

    A model without peftlab adapters (full fine-tuning) is saved as the Trainer always does.
    """

    def _peftlab_model(self) -> nn.Module | None:
        import peftlab

        model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        return model if peftlab.adapters(model) else None

    @contextlib.contextmanager
    def _gathered(self, model: nn.Module) -> Iterator[None]:
        """Whole trainable tensors on every rank while saving (DeepSpeed ZeRO-3 partitions them)."""
        if getattr(self, "is_deepspeed_enabled", False):
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(_trainable(model).values()), modifier_rank=None):
                yield
        else:
            yield

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._peftlab_model()
        if model is None:
            super()._save(output_dir, state_dict=state_dict)  # type: ignore[misc]
            return
        import peftlab

        output_dir = output_dir if output_dir is not None else self.args.output_dir  # type: ignore[attr-defined]
        with self._gathered(model):
            if not self.args.should_save:  # type: ignore[attr-defined]
                return
            os.makedirs(output_dir, exist_ok=True)
            peftlab.save(model, output_dir)
        tokenizer = self.processing_class  # type: ignore[attr-defined]
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        inner = self._peftlab_model()
        if inner is None:
            return
        from safetensors.torch import save_file
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial),  # type: ignore[attr-defined]
                              f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")  # type: ignore[attr-defined]
        with self._gathered(inner):
            if self.args.should_save and os.path.isdir(folder):  # type: ignore[attr-defined]
                save_file({n: p.detach().to("cpu", copy=True).contiguous() for n, p in _trainable(inner).items()},
                          os.path.join(folder, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        inner = self._peftlab_model()
        path = os.path.join(resume_from_checkpoint, TRAINABLE_FILE)
        if inner is None or not os.path.isfile(path):
            super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
            return
        from safetensors.torch import load_file

        from peftlab.core.errors import ConfigError

        saved, named = load_file(path), _trainable(inner)
        if saved.keys() != named.keys():
            raise ConfigError(f"{path} holds other trainable tensors than this model (missing: "
                              f"{sorted(set(named) - set(saved))[:5]}, unexpected: {sorted(set(saved) - set(named))[:5]})"
                              "; attach the same method with the same options before resuming")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(saved[n])

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint  # type: ignore[attr-defined]
        if self._peftlab_model() is not None and best and os.path.isfile(os.path.join(best, TRAINABLE_FILE)):
            self._load_from_checkpoint(best)
            return
        super()._load_best_model()  # type: ignore[misc]


def adapter_trainer(trainer_class: T) -> T:
    """``trainer_class`` (``transformers.Trainer`` or a subclass such as TRL's ``SFTTrainer``)
    with :class:`AdapterSaveMixin` mixed in."""
    return type(f"Peftlab{trainer_class.__name__}", (AdapterSaveMixin, trainer_class), {})  # type: ignore[return-value]


def __getattr__(name: str) -> Any:
    if name == "PeftlabTrainer":  # built on first use, so importing this module needs no transformers
        from transformers import Trainer

        cls = adapter_trainer(Trainer)
        globals()["PeftlabTrainer"] = cls
        return cls
    raise AttributeError(name)
