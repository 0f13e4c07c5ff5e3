"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, peft's layout.

* Only adapter tensors are written, never base weights (except base tensors an adapter trains
  in place, such as LoRA biases, and ``modules_to_save`` copies: exactly what peft writes).
* Tensor keys follow peft (``base_model.model.<module>.lora_A.weight``). Each method provides
  its table of keys (:meth:`Method.file_tensors`); nothing here knows any method.
* The full peftlab configuration and the base architecture also go into the safetensors
  header, so peftlab-only options (glob targets, layer ranges) round-trip exactly while
  ``adapter_config.json`` stays a config that peft reads without warnings.
* Loading never unpickles: safetensors only. Every mismatch is an error that lists the keys,
  and a failed load leaves the model as it was.
* Writes are atomic (temporary file, then rename): a full disk never leaves half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import __version__
from peftlab.core import slots
from peftlab.core.errors import AdapterFileError, PeftlabError
from peftlab.core.method import FILE_PREFIX, Method, method_class, method_from_config

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
DEFAULT = "default"


def adapter_dir(directory: str | os.PathLike[str], name: str) -> Path:
    """peft's convention: adapter 'default' in the directory itself, others in a subfolder."""
    return Path(directory) if name == DEFAULT else Path(directory) / name


def file_tensors(model: nn.Module, name: str) -> dict[str, tuple[str, torch.Tensor]]:
    """``{file key: (state_dict key, tensor)}`` of everything adapter ``name`` saves."""
    s = slots.slot(model, name)
    table = dict(s.method.file_tensors(model, name))
    table.update(slots.copy_file_tensors(model, name))
    # an inactive adapter's values of base tensors it trains wait aside, not in the model
    own = s.own if s.own is not None else slots.base_parameters(model, name)
    for key, t in own.items():
        table[s.method.base_file_key(model, key, name)] = (key, t)
    return table


def _canonical(key: str) -> str:
    """peft names a wrapped layer's own tensors ``<layer>.base_layer.<t>``; peftlab's layers are not
    wrapped. Matching ignores that difference."""
    return key.replace(".base_layer.", ".")


def _base_copies(model: nn.Module, keys: list[str], tensors: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Split unexpected file keys into copies of unchanged base weights (peft saves embedding
    weights alongside embedding adapters) and the rest."""
    state = model.state_dict()
    same, rest = [], []
    for key in keys:
        base = state.get(_canonical(key).removeprefix(FILE_PREFIX))
        if base is not None and base.shape == tensors[key].shape and base.device.type != "meta" \
                and torch.equal(base.to(tensors[key].dtype), tensors[key]):
            same.append(key)
        else:
            rest.append(key)
    return same, rest


def _architecture(model: nn.Module) -> dict[str, str]:
    cfg = getattr(model, "config", None)
    return {"model_class": type(model).__name__, "model_type": str(getattr(cfg, "model_type", ""))}


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise PeftlabError(f"could not write {path}: {e}. Nothing was overwritten; free some disk space "
                           "or choose another directory.") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: nn.Module, directory: str | os.PathLike[str], names: list[str] | str | None = None) -> list[Path]:
    """Write adapters to ``directory`` (all adapters by default); returns the folders written.

    Adapter ``"default"`` goes to ``directory`` itself, any other to ``directory/<name>`` (peft's
    convention, so ``PeftModel.from_pretrained`` and :func:`load` find them).
    """
    from safetensors.torch import save_file

    reg = slots.registry(model)
    names = list(reg.adapters) if names is None else [names] if isinstance(names, str) else list(names)
    written = []
    for name in names:
        s = slots.slot(model, name)
        out = adapter_dir(directory, name)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, (_, t) in file_tensors(model, name).items()}
        if any(t.device.type == "meta" for _, t in file_tensors(model, name).values()):
            raise PeftlabError("the adapter is on the meta device (no values yet); load or initialise it first")
        cfg = getattr(model, "config", None)
        config = {
            **s.method.to_config(model, name),
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        }
        metadata = {
            "format": "pt",
            "peftlab_version": __version__,
            "peftlab_method": s.method.method_name,
            "peftlab_options": json.dumps(s.method.options(), sort_keys=True),
            "peftlab_base": json.dumps(_architecture(model), sort_keys=True),
        }
        _atomic_write(out / WEIGHTS_NAME, lambda p, t=tensors, m=metadata: save_file(t, p, metadata=m))
        _atomic_write(out / CONFIG_NAME, lambda p, c=config: Path(p).write_text(json.dumps(c, indent=2) + "\n"))
        written.append(out)
    return written


def read(directory: str | os.PathLike[str]) -> tuple[Method, dict[str, torch.Tensor], dict[str, str]]:
    """Read one adapter folder: its method, its tensors by file key, and the file's metadata."""
    from safetensors import SafetensorError, safe_open

    d = Path(directory)
    if not d.is_dir():
        raise AdapterFileError(f"{d} is not a directory; pass the folder that holds {CONFIG_NAME}")
    weights = d / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in d.glob("*.bin")] + [p.name for p in d.glob("*.pt")]
        hint = (f" It holds {pickled}: pickle files are never loaded (they can run code). Convert them to "
                "safetensors where you trust them, e.g. with safetensors.torch.save_file.") if pickled else ""
        raise AdapterFileError(f"{d} has no {WEIGHTS_NAME}.{hint}")
    try:
        config = json.loads((d / CONFIG_NAME).read_text())
    except FileNotFoundError:
        raise AdapterFileError(f"{d} has no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME}") from None
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{d / CONFIG_NAME} is not valid JSON ({e})") from None
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items)
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterFileError(f"{weights} is not a readable safetensors file ({e}); it was not loaded "
                               "(peftlab never unpickles adapter files)") from None
    try:
        if "peftlab_options" in metadata:
            method = method_class(metadata["peftlab_method"]).from_options(json.loads(metadata["peftlab_options"]))
        else:
            method = method_from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise AdapterFileError(f"{d} holds an adapter configuration peftlab cannot use: {e}") from None
    return method, tensors, metadata


def load(model: nn.Module, directory: str | os.PathLike[str], name: str = DEFAULT, *,
         trainable: bool = False, activate: bool = True) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``model`` under ``name``.

    Reads files written by peftlab or by peft. On any mismatch (architecture, missing,
    unexpected or mis-shaped tensors) the model is left as it was and the error lists them.
    """
    from peftlab.api import attach, detach, use

    method, tensors, metadata = read(directory)
    if "peftlab_base" in metadata:
        want = json.loads(metadata["peftlab_base"])
        have = _architecture(model)
        if want.get("model_type") and have["model_type"] and want["model_type"] != have["model_type"]:
            raise AdapterFileError(
                f"{directory} was trained on a {want['model_type']!r} model ({want['model_class']}), "
                f"but this model is {have['model_type']!r} ({have['model_class']}); load it onto the "
                "architecture it was trained on")
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        attach(model, method, name, trainable=trainable, activate=False)
    except PeftlabError as e:
        raise AdapterFileError(f"the adapter in {directory} does not fit {type(model).__name__}: {e}") from e
    try:
        table = {_canonical(k): v for k, v in file_tensors(model, name).items()}
        by_canon = {_canonical(k): k for k in tensors}
        missing = sorted(set(table) - set(by_canon))
        unexpected = sorted(by_canon[k] for k in set(by_canon) - set(table))
        _, unexpected = _base_copies(model, unexpected, tensors)
        misshaped = sorted(f"{k}: file {tuple(tensors[by_canon[k]].shape)} vs model {tuple(table[k][1].shape)}"
                           for k in set(table) & set(by_canon) if tensors[by_canon[k]].shape != table[k][1].shape)
        if missing or unexpected or misshaped:
            parts = [f"{label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
                     for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                         ("mis-shaped keys", misshaped)) if keys]
            raise AdapterFileError(f"{directory} does not match the adapter built from its config on "
                                   f"{type(model).__name__}: " + "; ".join(parts))
        if any(t.device.type == "meta" for _, t in table.values()):
            raise AdapterFileError("cannot load values into a model on the meta device; "
                                   "materialise it first (e.g. model.to_empty(device='cpu'))")
        method.load_file_tensors(model, name, {key: (t, tensors[by_canon[key]]) for key, (_, t) in table.items()})
    except BaseException:
        detach(model, name)
        for p, flag in grads:
            p.requires_grad_(flag)
        raise
    if activate:
        use(model, name)
    return model
