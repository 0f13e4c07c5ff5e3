"""Export an adapter folder for a serving engine (vLLM) or for the peft library, checked.

``export(src_dir, out_dir, target)`` reads one adapter folder (no base model needed), converts
what converts *exactly*, refuses what does not (with the reason and the way out), and writes the
whole output folder atomically (:func:`peftlab.core.files.replace_folder`). The source folder is
only read. The output folder holds ``adapter_config.json`` + ``adapter_model.safetensors`` (peft's
layout), ``export_report.json`` (this export's report) and, where the adapter changed base
tensors (trained biases, ``modules_to_save`` copies), ``base_overrides.safetensors``: those
tensors under the base model's ``state_dict`` keys, to be written into the base checkpoint that
serves the adapter.

vLLM's rules, read in the public vllm-project/vllm sources (``vllm/lora/`` and ``vllm/config/``).
Two versions of ``peft_helper.py`` were read: "older" (``validate_legal`` checks
``bias_enabled``; no pattern fields) and "newest" (``get_rank_and_scaling`` reads the patterns;
``bias: Literal["none"]``, "Adapter bias is not supported"). vLLM takes any ``r`` up to the
server's ``--max-lora-rank`` (its weight slots are that wide, so zero padding costs no serving
memory); padding makes ``r`` itself one of the allowed values, the flag to pass.

| vLLM rule (file: function)                          | what this export does                               |
| --------------------------------------------------- | --------------------------------------------------- |
| ``config/lora.py``: ``MaxLoRARanks = Literal[1, 8,  | pads every module with zero rows of A / columns of  |
| 16, 32, 64, 128, 256, 320, 512]``; ``peft_helper.py | B to the next such rank (exact) and rescales alpha  |
| : validate_legal``: r > max_lora_rank is an error   | so the scale stays (rsLoRA: by sqrt); > 512 refused |
| ``peft_helper.py: PEFTHelper.from_dict`` keeps only | folds each module's scale into its B, writes one r  |
| its own fields: older drops rank_pattern and        | and alpha and no patterns: every release reads the  |
| alpha_pattern; newest reads them                    | same (one fp32 product per folded B)                |
| ``peft_helper.py: _validate_features``: "vLLM does  | refuses DoRA (way out: merge into the base)         |
| not yet support DoRA"; ``lora_model.py:             |                                                     |
| from_lora_tensors`` raises on a DoRA magnitude      |                                                     |
| ``peft_helper.py: validate_legal``: bias != "none"  | moves trained biases to base_overrides.safetensors, |
| needs bias_enabled (older), is refused (newest)     | writes bias "none"                                  |
| ``peft_helper.py: _validate_features``: "vLLM only  | moves module copies to base_overrides.safetensors   |
| supports modules_to_save being None" (newest: or    | (a copy replaces a base module), writes None        |
| ["classifier", "score"])                            |                                                     |
| newest ``_validate_features``: lora_bias, aLoRA,    | refuses them; PiSSA/OLoRA are already saved as a    |
| layer_replication, BD-LoRA, QALoRA, and inits that  | plain LoRA of the original base, so init is written |
| change the base (``_init_is_supported``: PiSSA,     | true; QLoRA's LoftQ refused                         |
| OLoRA, CorDA, LoftQ) refused                        |                                                     |
| ``lora/utils.py: get_supported_lora_modules``: the  | refuses convolution factors (3-D and more) and      |
| linear layers and the model's embedding modules;    | target_parameters (fused experts: vLLM's MoE LoRA   |
| ``parse_fine_tuned_lora_name``: lora_A/lora_B/      | layout differs by release)                          |
| lora_embedding_A/B keys                             |                                                     |

Other low-rank methods whose update *is* a LoRA are converted to plain LoRA: AdaLoRA
(``B diag(E) A``: ``E`` folded into ``A``, its scale ``alpha / (init_r + 1e-5)`` kept) and DyLoRA
(the first ``rank`` slices, scale ``alpha / rank``). IA3, LoHa, LoKr, OFT, VeRA, FLoRA, the prompt
methods, bottleneck adapters, BitFit, full fine-tuning and GaLore are refused with the reason.

``target="peft"``: methods peft has (LoRA, QLoRA's LoRA, AdaLoRA, IA3, LoHa, LoKr, OFT, VeRA, the
prompt methods); every config field is checked against the installed peft's config class
(``peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING``): a field peft would not read is dropped when it
holds no value and refused otherwise, and the config must build in peft. DyLoRA (peft has none) is
converted to a plain LoRA at its rank; the other peftlab-only methods are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from peftlab.core import files, state
from peftlab.core.errors import ConfigError
from peftlab.core.method import FILE_PREFIX, Method
from peftlab.methods._lowrank import pattern_value

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""vLLM's allowed ``--max-lora-rank`` values (``vllm/config/lora.py``: ``MaxLoRARanks``)."""
OVERRIDES_NAME = "base_overrides.safetensors"
REPORT_NAME = "export_report.json"
TARGETS = ("vllm", "peft")
LORA_FAMILY = ("lora", "qlora", "adalora", "dylora")
"""Methods whose adapter is exactly a LoRA (converted for vLLM)."""

REFUSED_FOR_VLLM: dict[str, str] = {
    "ia3": "IA3 scales activations by trained vectors; vLLM serves LoRA only (vllm/lora/). Merge it into the "
           "base (peftlab.merge_and_unload) and serve the merged model",
    "loha": "LoHa's update is a Hadamard product of two low-rank products, not one LoRA B A; vLLM serves LoRA "
            "only. Merge it into the base and serve the merged model",
    "lokr": "LoKr's update is a Kronecker product, not a LoRA B A; vLLM serves LoRA only. Merge it into the base "
            "and serve the merged model",
    "oft": "OFT rotates the weight (W R), not a low-rank sum; vLLM serves LoRA only. Merge it into the base and "
           "serve the merged model",
    "vera": "VeRA is a LoRA with shared frozen factors, but slicing them needs each layer's input width, which the "
            "adapter folder does not hold; merge it into the base and serve the merged model",
    "flora": "FLoRA's update is a Tucker product: a LoRA only on 2-D weights, and whether such a weight is stored "
             "(out, in), (in, out) (GPT-2 Conv1D) or is an embedding is not in the adapter folder; merge it into the "
             "base and serve the merged model",
    "prompt_tuning": "prompt methods prepend virtual tokens; vLLM's LoRA loader reads lora_A/lora_B tensors only",
    "p_tuning": "prompt methods prepend virtual tokens; vLLM's LoRA loader reads lora_A/lora_B tensors only",
    "prefix_tuning": "prefix tuning adds key/value prefixes; vLLM's LoRA loader reads lora_A/lora_B tensors only",
    "houlsby": "bottleneck adapters add non-linear modules; vLLM serves LoRA only. Serve with peftlab, or train a "
               "LoRA",
    "pfeiffer": "bottleneck adapters add non-linear modules; vLLM serves LoRA only. Serve with peftlab, or train a "
                "LoRA",
    "compacter": "Compacter adds non-linear adapter modules; vLLM serves LoRA only. Serve with peftlab, or train a "
                 "LoRA",
    "fusion": "AdapterFusion combines bottleneck adapters with attention; vLLM serves LoRA only",
    "bitfit": "BitFit trains base biases only, no LoRA: merge it (peftlab.merge_and_unload) and serve the merged "
              "model",
    "full": "full fine-tuning trains every base weight: the result is a model, not an adapter; load it onto the "
            "base (peftlab.load) and save the model (save_pretrained) to serve it",
    "galore": "GaLore trains every base weight: the result is a model, not an adapter; load it onto the base "
              "(peftlab.load) and save the model (save_pretrained) to serve it",
}

REFUSED_FOR_PEFT: dict[str, str] = {
    "houlsby": "peft has no bottleneck adapters (Houlsby); serve it with peftlab",
    "pfeiffer": "peft has no bottleneck adapters (Pfeiffer); serve it with peftlab",
    "compacter": "peft has no Compacter; serve it with peftlab",
    "fusion": "peft has no AdapterFusion; serve it with peftlab",
    "flora": "peft has no FLoRA; serve it with peftlab",
    "bitfit": "peft has no BitFit; merge it (peftlab.merge_and_unload) and save the model",
    "full": "full fine-tuning trains every base weight: the file is a model, not a peft adapter; load it onto the "
            "base (peftlab.load) and save the model (save_pretrained)",
    "galore": "GaLore trains every base weight: the file is a model, not a peft adapter; load it onto the base "
              "(peftlab.load) and save the model (save_pretrained)",
}

_UNSUPPORTED_LORA_FIELDS = {
    "lora_bias": "vLLM does not support LoRA bias (peft's lora_bias)",
    "layer_replication": "vLLM does not support layer_replication",
    "alora_invocation_tokens": "vLLM does not support Activated LoRA (aLoRA)",
    "use_bdlora": "vLLM does not support block-diagonal LoRA (BD-LoRA)",
    "use_qalora": "vLLM does not support QALoRA",
    "target_parameters": "LoRA on fused expert parameters (target_parameters): vLLM's MoE LoRA layout differs by "
                         "release and is not converted here",
}


class ExportRefused(ConfigError):
    """The adapter cannot be made acceptable to the target; ``report`` says why and the way out."""

    def __init__(self, report: ExportReport) -> None:
        super().__init__(f"export of {report.source} for {report.target} refused: " + "; ".join(report.refused)
                         + f". Nothing was written to {report.output_dir}.")
        self.report = report


@dataclass
class ExportReport:
    """What one export did: the files written, each conversion (what, how, exact or not), the
    fields dropped, what the user must do (``instructions``) and, for a refusal, why."""

    source: str
    target: str
    output_dir: str
    method: str = ""
    written: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.refused

    def rows(self) -> list[tuple[str, str]]:
        """``(section, line)`` rows in report order."""
        out = [("method", self.method), ("target", self.target), ("output", self.output_dir if self.ok else "-")]
        for section, lines in (("written", self.written), ("converted", self.converted), ("dropped", self.dropped),
                               ("to do", self.instructions), ("refused", self.refused)):
            out += [(section, line) for line in lines]
        return out

    def table(self) -> str:
        """The report as a two-column text table."""
        rows = self.rows()
        width = max(len(s) for s, _ in rows)
        return "\n".join(f"{s:<{width}}  {line}" for s, line in rows)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


# ----------------------------------------------------------------------------- reading
@dataclass
class _Factors:
    """One module's LoRA: ``delta W = scale * B @ A`` (A: ``r x d_in``, B: ``d_out x r``)."""

    a_key: str
    b_key: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


_LORA_KEYS = ((".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B"))


def _split_lora(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, tuple[str, str]], dict[str, torch.Tensor]]:
    """``({module path: (A key, B key)}, {other key: tensor})``: LoRA factor pairs and the rest."""
    pairs: dict[str, tuple[str, str]] = {}
    rest = {}
    for key, t in tensors.items():
        for a_suffix, b_suffix in _LORA_KEYS:
            if key.endswith(a_suffix) and key.startswith(FILE_PREFIX):
                path = key[len(FILE_PREFIX):-len(a_suffix)]
                pairs[path] = (key, key[:-len(a_suffix)] + b_suffix)
                break
        else:
            if not any(key.endswith(b) for _, b in _LORA_KEYS):
                rest[key] = t
    return pairs, rest


def _base_key(file_key: str) -> str:
    """The base model's ``state_dict`` key of a base tensor saved in a peft file."""
    key = file_key.removeprefix(FILE_PREFIX)
    return key.replace(".base_layer.", ".").replace(".modules_to_save.", ".")


# ----------------------------------------------------------------------------- vLLM
def _lora_factors(method: Method, pairs: dict[str, tuple[str, str]], tensors: dict[str, torch.Tensor],
                  report: ExportReport) -> dict[str, _Factors]:
    """Factors and per-module scales of a LoRA/QLoRA file (rank_pattern/alpha_pattern applied)."""
    out = {}
    for path, (ka, kb) in sorted(pairs.items()):
        a, b = tensors[ka], tensors[kb]
        r = pattern_value(method.rank_pattern, path, method.r)  # type: ignore[attr-defined]
        if a.shape[0] != r:
            report.refused.append(f"{path}: the file's rank {a.shape[0]} is not the config's {r} (edited config?); "
                                  "save the adapter again")
        alpha = pattern_value(method.alpha_pattern, path, method.alpha)  # type: ignore[attr-defined]
        scale = alpha / math.sqrt(a.shape[0]) if method.rslora else alpha / a.shape[0]  # type: ignore[attr-defined]
        out[path] = _Factors(ka, kb, a, b, scale)
    return out


def _adalora_factors(method: Method, tensors: dict[str, torch.Tensor], report: ExportReport) -> dict[str, _Factors]:
    """AdaLoRA ``P diag(E) Q`` as a LoRA: ``A = diag(E) Q``, ``B = P``, scale ``alpha / (init_r + 1e-5)``."""
    from peftlab.methods.adalora import EPS

    out = {}
    scale = method.alpha / (method.init_r + EPS)  # type: ignore[attr-defined]
    for key in sorted(tensors):
        if not key.endswith(".lora_E"):
            continue
        stem = key[:-len(".lora_E")]
        q, e, p = tensors[f"{stem}.lora_A"], tensors[key], tensors[f"{stem}.lora_B"]
        a = (q.float() * e.float()).to(q.dtype)  # E is r x 1: row i of Q times E_i
        out[stem.removeprefix(FILE_PREFIX)] = _Factors(f"{stem}.lora_A.weight", f"{stem}.lora_B.weight", a, p, scale)
    report.converted.append(f"AdaLoRA -> LoRA: lora_E folded into lora_A of {len(out)} modules (A = diag(E) A, one "
                            f"fp32 product rounded once); scale alpha / (init_r + 1e-5) = {scale:.6g} kept")
    return out


def _dylora_factors(method: Method, pairs: dict[str, tuple[str, str]], tensors: dict[str, torch.Tensor],
                    report: ExportReport) -> dict[str, _Factors]:
    """DyLoRA at its chosen rank ``b``: the first ``b`` slices, scale ``alpha / b`` (exact)."""
    b_rank = method.eval_rank  # type: ignore[attr-defined]
    scale = method.alpha / b_rank  # type: ignore[attr-defined]
    out = {path: _Factors(ka, kb, tensors[ka][:b_rank].contiguous(), tensors[kb][:, :b_rank].contiguous(), scale)
           for path, (ka, kb) in sorted(pairs.items())}
    r_max = method.r_max  # type: ignore[attr-defined]
    report.converted.append(f"DyLoRA -> LoRA at its rank {b_rank} (of r_max {r_max}): the first {b_rank} "
                            f"slices of {len(out)} modules, scale alpha / rank = {scale:.6g} (exact)")
    return out


def _next_rank(r: int) -> int | None:
    return next((v for v in VLLM_MAX_LORA_RANKS if v >= r), None)


def _vllm(method: Method, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: ExportReport
          ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(config, adapter tensors, base overrides) of a vLLM-loadable plain LoRA."""
    name = method.method_name
    if name not in LORA_FAMILY:
        report.refused.append(f"{name}: " + REFUSED_FOR_VLLM.get(name, f"{name} is not a LoRA; vLLM serves LoRA only"))
        return {}, {}, {}
    if getattr(method, "dora", False) or any(k.endswith(".lora_magnitude_vector") for k in tensors):
        report.refused.append("DoRA (use_dora): vLLM does not support DoRA (vllm/lora/peft_helper.py "
                              "_validate_features; lora_model.py raises on a DoRA magnitude). Merge the adapter into "
                              "the base (peftlab.merge_and_unload) and serve the merged model, or train plain LoRA")
    if getattr(method, "init", "default") == "loftq":
        report.refused.append("QLoRA init='loftq' changes the quantized base weights; vLLM refuses LoftQ adapters "
                              "(peft_helper.py _init_is_supported): serve the merged model instead")
    for key, why in _UNSUPPORTED_LORA_FIELDS.items():
        if config.get(key) not in (None, False, [], {}, "") or (key == "target_parameters"
                                                                  and getattr(method, "target_parameters", ())):
            report.refused.append(f"{key}={config.get(key)!r}: {why}")
    pairs, rest = _split_lora(tensors)
    if name == "adalora":
        factors = _adalora_factors(method, tensors, report)
        rest = {k: t for k, t in tensors.items() if not k.endswith((".lora_A", ".lora_B", ".lora_E"))}
    elif name == "dylora":
        factors = _dylora_factors(method, pairs, tensors, report)
    else:
        factors = _lora_factors(method, pairs, tensors, report)
    conv = sorted(p for p, f in factors.items() if f.a.dim() != 2 or f.b.dim() != 2)
    if conv:
        report.refused.append(f"convolution LoRA on {conv[:4]}{' ...' if len(conv) > 4 else ''}: vLLM applies LoRA "
                              "to linear and embedding layers only (vllm/lora/utils.py get_supported_lora_modules); "
                              "exclude these modules (exclude_modules) or merge the adapter into the base")
    if not factors and not report.refused:
        report.refused.append("the adapter holds no LoRA factors; nothing for vLLM to load")
    r_max = max((f.rank for f in factors.values()), default=0)
    r_out = _next_rank(r_max)
    if r_out is None:
        report.refused.append(f"rank {r_max} is above vLLM's largest max_lora_rank {VLLM_MAX_LORA_RANKS[-1]} "
                              "(vllm/config/lora.py MaxLoRARanks); retrain with a lower rank or merge the adapter")
    if report.refused:
        return {}, {}, {}
    assert r_out is not None
    rslora = bool(getattr(method, "rslora", False))
    out_tensors = _padded(factors, r_out, rslora, report)
    alpha_out = _alpha_for(Counter(f.scale for f in factors.values()).most_common(1)[0][0], r_out, rslora)
    _fold_scales(factors, out_tensors, alpha_out, r_out, rslora, report)
    overrides = _overrides(rest, method, report)
    out_config = _lora_config(method, config, factors, r_out, alpha_out, rslora, report)
    report.instructions.insert(0, f"serve with --enable-lora --max-lora-rank {r_out} (or larger)")
    return out_config, out_tensors, overrides


def _alpha_for(scale: float, r: int, rslora: bool) -> float | int:
    """``lora_alpha`` that gives ``scale`` at rank ``r`` (an int where that is exact)."""
    alpha = scale * (math.sqrt(r) if rslora else r)
    near = round(alpha)
    return near if near > 0 and abs(alpha - near) <= 1e-9 * max(1.0, abs(alpha)) else alpha


def _padded(factors: dict[str, _Factors], r_out: int, rslora: bool, report: ExportReport) -> dict[str, torch.Tensor]:
    """Every module's factors at rank ``r_out`` (zero rows of A, zero columns of B: exact)."""
    out = {}
    padded = 0
    for f in factors.values():
        a, b = f.a, f.b
        if f.rank < r_out:
            a = torch.cat([a, a.new_zeros(r_out - f.rank, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], r_out - f.rank)], dim=1)
            padded += 1
        out[f.a_key], out[f.b_key] = a.contiguous(), b.contiguous()
    ranks = sorted({f.rank for f in factors.values()})
    if padded:
        report.converted.append(f"rank {ranks if len(ranks) > 1 else ranks[0]} padded with zeros to {r_out} (vLLM's "
                                f"next max_lora_rank) in {padded} of {len(factors)} modules: exact; "
                                f"lora_alpha rescaled so alpha / {'sqrt(r)' if rslora else 'r'} is unchanged")
    return out


def _fold_scales(factors: dict[str, _Factors], out: dict[str, torch.Tensor], alpha_out: float, r_out: int,
                 rslora: bool, report: ExportReport) -> None:
    """Fold each module's scale into its B where it differs from the one global scale."""
    global_scale = alpha_out / math.sqrt(r_out) if rslora else alpha_out / r_out  # as peft and vLLM compute it
    folded = []
    for path, f in factors.items():
        if not math.isclose(f.scale, global_scale, rel_tol=1e-12):  # an ulp from recomputing alpha: no fold
            b = out[f.b_key]
            out[f.b_key] = (b.float() * (f.scale / global_scale)).to(b.dtype).contiguous()
            folded.append(path)
    if folded:
        report.converted.append(f"per-module scales (rank_pattern/alpha_pattern) folded into lora_B of {len(folded)} "
                                f"modules (B * s_module / s_global, one fp32 product rounded once); one global "
                                f"r={r_out}, lora_alpha={alpha_out}; the patterns are removed (older vLLM releases "
                                "ignore them, the newest reads them: both now give the trained scales)")


def _overrides(rest: dict[str, torch.Tensor], method: Method, report: ExportReport) -> dict[str, torch.Tensor]:
    """Base tensors the adapter trained (biases) or replaced (module copies), under base keys."""
    out = {}
    for key, t in sorted(rest.items()):
        if ".original_module." in key:
            report.dropped.append(f"{key}: the frozen original of a module copy (the copy replaces it)")
            continue
        out[_base_key(key)] = t.contiguous()
    if not out:
        return out
    biases = sorted(k for k in out if k.endswith(".bias"))
    copies = sorted(set(out) - set(biases))
    if biases:
        report.converted.append(f"bias={getattr(method, 'bias', 'none')!r}: {len(biases)} trained bias tensors moved "
                                f"to {OVERRIDES_NAME} (vLLM loads no adapter bias: peft_helper.py validate_legal); "
                                "config bias='none'")
    mts = tuple(getattr(method, "modules_to_save", ()))
    if copies:
        report.converted.append(f"modules_to_save {list(mts)}: {len(copies)} tensors of the module copies moved to "
                                f"{OVERRIDES_NAME} (vLLM: 'only supports modules_to_save being None', "
                                "peft_helper.py _validate_features); config modules_to_save=None")
    report.instructions.append(f"write the {len(out)} tensors of {OVERRIDES_NAME} into the base checkpoint (same "
                               "state_dict keys, e.g. model.load_state_dict(overrides, strict=False) then "
                               "save_pretrained) and serve the adapter on that base; without them outputs differ")
    tied = sorted(k for k in copies if k.startswith("lm_head.") or ".embed_tokens." in f".{k}")
    if tied:
        report.instructions.append(f"{tied}: if the base ties lm_head to embed_tokens (tie_word_embeddings), untie "
                                   "them in the base checkpoint first: the copy replaces one module, not both")
    return out


def _lora_config(method: Method, config: dict[str, Any], factors: dict[str, _Factors], r_out: int,
                 alpha_out: float, rslora: bool, report: ExportReport) -> dict[str, Any]:
    """peft's LoRA config with one rank and alpha, no bias, no module copies: what vLLM reads."""
    from peftlab.methods.lora import LoRA

    if method.method_name in ("lora", "qlora"):
        out = {k: v for k, v in config.items() if not k.startswith("peftlab")}
        dropped = sorted(k for k in config if k.startswith("peftlab"))
        if dropped:
            report.dropped.append(f"config fields {dropped} (peftlab's own; vLLM and peft do not read them)")
    else:  # a converted method: a fresh LoRA config naming the exact modules
        out = LoRA(r=r_out, alpha=float(alpha_out), target_modules=tuple(sorted(factors))).to_config(None)
        out.update({k: config[k] for k in ("base_model_name_or_path", "auto_mapping", "task_type") if k in config})
    if method.method_name == "qlora":
        report.instructions.append("the adapter was trained on a quantized base (QLoRA): serve it on the same base "
                                   "quantized the same way (e.g. vLLM --quantization bitsandbytes) for the trained "
                                   "outputs; on the full-precision base outputs differ slightly")
    out.update({"peft_type": "LORA", "r": r_out, "lora_alpha": alpha_out, "use_rslora": rslora, "rank_pattern": {},
                "alpha_pattern": {}, "bias": "none", "modules_to_save": None, "use_dora": False,
                "init_lora_weights": True, "lora_bias": False, "target_parameters": None})
    return out


# ----------------------------------------------------------------------------- peft
def _dylora_for_peft(method: Method, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: ExportReport
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """peft has no DyLoRA: its adapter at the chosen rank is a plain LoRA (exact); module copies
    stay in the file under ``modules_to_save``, as peft saves them."""
    pairs, rest = _split_lora(tensors)
    factors = _dylora_factors(method, pairs, tensors, report)
    if any(f.a.dim() != 2 for f in factors.values()):  # peft's conv LoRA keys differ: not converted here
        report.refused.append("DyLoRA on convolutions is not converted for peft; serve it with peftlab")
        return {}, {}, {}
    r_out = max(f.rank for f in factors.values())
    out = {k: t for f in factors.values() for k, t in ((f.a_key, f.a), (f.b_key, f.b))}
    alpha_out = _alpha_for(Counter(f.scale for f in factors.values()).most_common(1)[0][0], r_out, False)
    out_config = _lora_config(method, config, factors, r_out, alpha_out, False, report)
    out_config["modules_to_save"] = list(method.modules_to_save) or None
    return out_config, {**out, **rest}, {}


def _peft(method: Method, config: dict[str, Any], tensors: dict[str, torch.Tensor], report: ExportReport
          ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    name = method.method_name
    if name == "dylora":
        return _dylora_for_peft(method, config, tensors, report)
    if name in REFUSED_FOR_PEFT or method.peft_type is None:
        report.refused.append(f"{name}: " + REFUSED_FOR_PEFT.get(name, f"peft has no {name}"))
        return {}, {}, {}
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except ImportError:
        raise ConfigError("export --for peft checks the config against the installed peft: pip install peft") from None
    peft_type = config.get("peft_type")
    cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if cls is None:
        report.refused.append(f"peft_type {peft_type!r} is not a config type of the installed peft "
                              f"({sorted(PEFT_TYPE_TO_CONFIG_MAPPING)[:6]} ...); upgrade peft")
        return {}, {}, {}
    known = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in config.items():
        if key in known:
            out[key] = value
        elif key.startswith("peftlab") or value in (None, False, [], {}, ""):
            report.dropped.append(f"config field {key}={value!r}: not a field of peft's {cls.__name__} (peft would "
                                  "warn and ignore it)")
        else:
            report.refused.append(f"config field {key}={value!r} is not a field of the installed peft's "
                                  f"{cls.__name__}: peft would ignore it and compute other outputs; upgrade peft "
                                  "or retrain without that option")
    if report.refused:
        return {}, {}, {}
    try:
        cls(**{k: v for k, v in out.items() if k != "peft_type"})
    except Exception as e:  # peft's own validation of the values
        report.refused.append(f"peft's {cls.__name__} refuses this config ({type(e).__name__}: {e})")
        return {}, {}, {}
    if name == "qlora":
        report.instructions.append("the adapter was trained on a quantized base (QLoRA): load it in peft onto the "
                                   "base quantized the same way (bitsandbytes NF4) for the trained outputs")
    report.converted.append(f"{cls.__name__}: every field checked against peft {_peft_version()} and the config "
                            "built in peft; tensors copied unchanged")
    return out, dict(tensors), {}


def _peft_version() -> str:
    import peft

    return str(getattr(peft, "__version__", "?"))


# ----------------------------------------------------------------------------- export
def _check_dirs(src: Path, out: Path) -> None:
    s, o = Path(os.path.realpath(src)), Path(os.path.realpath(out))
    if s == o:
        raise ConfigError(f"the output folder {out} is the source folder; export writes a new folder (pass another "
                          "path, e.g. <adapter>-vllm)")
    if s in o.parents:
        raise ConfigError(f"the output folder {out} is inside the source folder {src}, which export never changes; "
                          "pass a path outside it")
    if o.exists() and (not o.is_dir() or any(o.iterdir())):
        raise ConfigError(f"the output folder {out} exists and is not empty; export writes a whole new folder "
                          "(remove it or pass another path)")


def export(src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
           target: Literal["vllm", "peft"]) -> ExportReport:
    """Export the adapter in ``src_dir`` to the new folder ``out_dir`` for ``target``.

    Returns:
        The report of what was written and converted.

    Raises:
        ExportRefused: The adapter cannot be made acceptable to ``target`` (``.report`` lists why,
            each with the way out); nothing is written.
        ConfigError: A bad target or output folder.
        AdapterFileError: The source folder is not a readable adapter.
    """
    import safetensors.torch

    if target not in TARGETS:
        raise ConfigError(f"export target must be one of {TARGETS} (got {target!r})")
    src, out = Path(src_dir), Path(out_dir)
    _check_dirs(src, out)
    method, tensors, _ = state.read(src)
    config = files.parse_json((src / state.CONFIG_NAME).read_bytes(), str(src / state.CONFIG_NAME))
    report = ExportReport(source=str(src), target=target, output_dir=str(out), method=method.method_name)
    build = _vllm if target == "vllm" else _peft
    out_config, out_tensors, overrides = build(method, config, tensors, report)
    if report.refused:
        raise ExportRefused(report)
    report.written = [state.CONFIG_NAME, state.WEIGHTS_NAME] + ([OVERRIDES_NAME] if overrides else []) + [REPORT_NAME]
    with files.replace_folder(out, "the export") as tmp:
        safetensors.torch.save_file(out_tensors, str(tmp / state.WEIGHTS_NAME), metadata={"format": "pt"})
        files.write_bytes(tmp / state.CONFIG_NAME, (json.dumps(out_config, indent=2) + "\n").encode())
        if overrides:
            safetensors.torch.save_file(overrides, str(tmp / OVERRIDES_NAME), metadata={"format": "pt"})
        files.write_bytes(tmp / REPORT_NAME, report.to_json().encode())
    return report
