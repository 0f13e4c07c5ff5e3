"""P-tuning (Liu et al., 2021, "GPT Understands, Too", https://arxiv.org/abs/2103.10385).

Like prompt tuning, ``N`` virtual tokens go in front of the input, but while training they are the
output of a small *prompt encoder* (an MLP, or a bidirectional LSTM followed by an MLP) applied to
trainable input embeddings. The paper finds the reparameterisation makes optimisation more stable
than training the prompt directly.

What is saved is the encoder's *output* (``prompt_embeddings``, ``N x hidden``, peft's layout), so
inference needs no encoder: a loaded adapter holds that output directly (and, loaded with
``trainable=True``, trains it directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from peftlab.core.errors import ConfigError
from peftlab.core.method import register
from peftlab.methods.prompt_tuning import PromptTuning, adapter_dtype, submodules

ENCODERS = ("mlp", "lstm")


class PromptEncoder(nn.Module):
    """Trainable inputs (``embedding``) and the encoder that turns them into the prompt.

    Layer names follow peft (``embedding``, ``mlp_head``, ``lstm_head``). Without heads (after
    loading a saved output) ``embedding.weight`` is the prompt itself.
    """

    def __init__(self, n: int, dim: int, hidden: int, kind: str, layers: int, dropout: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(n, dim, **kw)
        self.lstm_head: nn.LSTM | None = None
        if kind == "lstm":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=layers, dropout=dropout if layers > 1 else 0.0,
                                     bidirectional=True, batch_first=True, **kw)
            self.mlp_head: nn.Sequential | None = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, **kw), nn.ReLU(), nn.Linear(2 * hidden, dim, **kw))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden, **kw), nn.ReLU(), nn.Linear(hidden, hidden, **kw),
                                          nn.ReLU(), nn.Linear(hidden, dim, **kw))

    def prompt(self) -> torch.Tensor:
        x = self.embedding.weight
        if self.lstm_head is not None:
            x = self.lstm_head(x.unsqueeze(0))[0][0]
        return self.mlp_head(x) if self.mlp_head is not None else x

    def use_saved(self, value: torch.Tensor) -> None:
        """Drop the encoder and hold the saved prompt (the encoder's output) directly."""
        self.lstm_head = None
        self.mlp_head = None
        with torch.no_grad():
            self.embedding.weight.copy_(value.to(self.embedding.weight.dtype))


@register("p_tuning")
@dataclass(frozen=True)
class PTuning(PromptTuning):
    """Virtual tokens produced by a trainable prompt encoder (MLP or LSTM); saved as its output."""

    encoder: str = "mlp"
    """'mlp' (three linear layers, peft's default) or 'lstm' (bidirectional LSTM, then an MLP)."""
    encoder_hidden_size: int | None = None
    """Width of the encoder; None: the model's hidden size."""
    encoder_num_layers: int = 2
    """LSTM layers (the MLP always has three linear layers)."""
    encoder_dropout: float = 0.0
    """Dropout between LSTM layers."""

    peft_type: ClassVar[str | None] = "P_TUNING"
    saves_trainable_parameters: ClassVar[bool] = False
    suggested_lr: ClassVar[float] = 1e-2

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder not in ENCODERS:
            raise ConfigError(f"p_tuning: encoder must be one of {ENCODERS} (got {self.encoder!r})")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"p_tuning: encoder_hidden_size must be positive (got {self.encoder_hidden_size})")
        if self.encoder_num_layers < 1:
            raise ConfigError(f"p_tuning: encoder_num_layers must be >= 1 (got {self.encoder_num_layers})")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"p_tuning: encoder_dropout must be in [0, 1) (got {self.encoder_dropout})")

    def build(self, model: nn.Module) -> nn.Module:
        emb = self._check_model(model)
        w = emb.weight
        dim = w.shape[1]
        module = PromptEncoder(self.rows(), dim, self.encoder_hidden_size or dim, self.encoder,
                               self.encoder_num_layers, self.encoder_dropout, w.device, adapter_dtype(w))
        self._init_prompt(module.embedding.weight, w, self._init_ids(w.shape[0]))
        return module

    def file_tensors(self, model: nn.Module, name: str) -> dict[str, tuple[str, torch.Tensor]]:
        table = super().file_tensors(model, name)
        # the derived prompt is saved detached: it is a value to write, not a parameter to train
        return {k: (key, t if isinstance(t, nn.Parameter) else t.detach()) for k, (key, t) in table.items()}

    def to_config(self, model: nn.Module | None = None, name: str = "default") -> dict[str, Any]:
        common = self._peft_common(model)
        return {"peft_type": self.peft_type, **common,
                "encoder_reparameterization_type": self.encoder.upper(),
                "encoder_hidden_size": self.encoder_hidden_size or common["token_dim"],
                "encoder_num_layers": self.encoder_num_layers, "encoder_dropout": self.encoder_dropout}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PTuning:
        if "peftlab_method" in config or config.get("peft_type") != cls.peft_type:
            return super().from_config(config)  # type: ignore[return-value]
        return cls(num_virtual_tokens=int(config["num_virtual_tokens"]), init="random",
                   num_transformer_submodules=submodules(config),
                   encoder=str(config.get("encoder_reparameterization_type") or "MLP").lower(),
                   encoder_hidden_size=config.get("encoder_hidden_size"),
                   encoder_num_layers=int(config.get("encoder_num_layers") or 2),
                   encoder_dropout=float(config.get("encoder_dropout") or 0.0),
                   modules_to_save=tuple(config.get("modules_to_save") or ()))



