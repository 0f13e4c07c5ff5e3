"""Adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, peft's layout.

* Only adapter tensors are written, never base weights (except base tensors an adapter trains
  in place, such as LoRA biases, and ``modules_to_save`` copies: exactly what peft writes).
* Tensor keys follow peft (``base_model.model.<module>.lora_A.weight``). Each method provides
  its table of keys (:meth:`Method.file_tensors`); nothing here knows any method.
* **One source of truth**: ``adapter_config.json`` is what peft reads, and what peftlab
  follows. The safetensors header also holds the full peftlab options (glob targets, layer
  ranges, which a peft config cannot express) with the sha256 of the config they were saved
  with: they are used only while the config is unchanged. A config edited afterwards (or one
  peft wrote) is followed as it stands, as peft follows it, with a warning that names what
  the header said differently.
* **Loading is inert**: nothing named in a file is imported, loaded or executed (a tokenizer
  is the caller's); only regular files of bounded size are read (see :mod:`peftlab.core.files`);
  the safetensors header is read first, the adapter the config describes is attached to a copy
  of the model on the meta device, and keys, shapes and dtypes are compared before any tensor
  is read or allocated; the tensor data must match the checksum in the header. Every problem
  is an :class:`AdapterFileError` naming the file and the field, and the model is not touched
  until everything has been checked.
* **Saving is atomic as a folder**: the complete new folder is built next to the target and
  swapped in (:func:`peftlab.core.files.replace_folder`), so a reader sees the old adapter or
  the new one, never a mix, and a failed save leaves the old one untouched.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftlab import __version__
from peftlab.core import files, slots
from peftlab.core.errors import AdapterFileError, AdapterStateError, ConfigError, PeftlabError
from peftlab.core.layer import adapter_layers
from peftlab.core.method import FILE_PREFIX, Method, method_class, method_from_config, methods
from peftlab.core.transaction import before_write, transaction

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
    table.update(slots.copy_file_tensors(model, name, s.method.file_prefix))
    # an inactive adapter's values of base tensors it trains wait aside, not in the model
    own = s.own if s.own is not None else slots.base_parameters(model, name)
    copied = [path for path, _ in slots.copy_layers(model)]
    for key, t in own.items():
        file_key = s.method.base_file_key(model, key, name)
        root = next((c for c in copied if key.startswith(c + ".")), None)
        if root is not None:  # the frozen original inside a module copy: peft's `original_module`
            file_key = file_key.replace(f"{root}.", f"{root}.original_module.", 1)
        table[file_key] = (key, t)
    return table


def _canonical(key: str) -> str:
    """peft names a wrapped layer's own tensors ``<layer>.base_layer.<t>``; peftlab's layers are not
    wrapped. Matching ignores that difference for a base tensor (``base_layer.<tensor>``), not for
    adapter tensors nested in it (``base_layer.lora_A.weight``: peft's second target parameter)."""
    key = re.sub(r"\.base_layer\.(?=[^.]+$)", ".", key)
    # peft saves a module copy's tensors under the module's keys, and with bias="all" the copy's
    # biases once more under `<module>.modules_to_save.` (the same values): one name for both
    return key.replace(".modules_to_save.", ".")


def _architecture(model: nn.Module) -> dict[str, str]:
    cfg = getattr(model, "config", None)
    return {"model_class": type(model).__name__, "model_type": str(getattr(cfg, "model_type", ""))}


def _config_digest(config: dict[str, Any]) -> str:
    """sha256 of a parsed config in canonical form (key order and spacing do not count)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _data_digest(tensors: dict[str, bytes | bytearray | memoryview]) -> str:
    """sha256 over every tensor's name and raw bytes, in name order (independent of file layout)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode() + b"\0")
        h.update(tensors[key])
    return h.hexdigest()


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# ----------------------------------------------------------------------------- save
def save(model: nn.Module, directory: str | os.PathLike[str], names: list[str] | str | None = None) -> list[Path]:
    """Write adapters to ``directory`` (all adapters by default); returns the folders written.

    Adapter ``"default"`` goes to ``directory`` itself, any other to ``directory/<name>`` (peft's
    convention, so ``PeftModel.from_pretrained`` and :func:`load` find them). ``directory`` is
    replaced as a whole: its other files stay (carried over into the new folder), and a reader
    sees either the old or the new folder.

    Raises:
        PeftlabError: The adapter cannot be saved, or writing failed; the message says what
            ``directory`` holds then (on a failure before the swap, the previous folder, unchanged).
    """
    import safetensors.torch

    reg = slots.registry(model)
    names = list(reg.adapters) if names is None else [names] if isinstance(names, str) else list(names)
    built: dict[str, tuple[dict[str, torch.Tensor], bytes, dict[str, str]]] = {}
    for name in names:  # everything is computed before anything is written
        s = slots.slot(model, name)
        table = file_tensors(model, name)
        if any(t.device.type == "meta" for _, t in table.values()):
            raise PeftlabError("the adapter is on the meta device (no values yet); load or initialise it first")
        tensors = {k: t.detach().to("cpu", copy=True).contiguous() for k, (_, t) in table.items()}
        method, tensors = s.method.saved_form(model, name, tensors)
        cfg = getattr(model, "config", None)
        config = {
            **method.to_config(model, name),
            "base_model_name_or_path": getattr(cfg, "_name_or_path", None) or None,
            "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        }
        text = json.dumps(config, indent=2) + "\n"
        metadata = {
            "format": "pt",
            "peftlab_version": __version__,
            "peftlab_method": method.method_name,
            "peftlab_options": json.dumps(method.options(), sort_keys=True),
            "peftlab_base": json.dumps(_architecture(model), sort_keys=True),
            "peftlab_config_sha256": _config_digest(json.loads(text)),
            "peftlab_data_sha256": _data_digest({k: _raw(t) for k, t in tensors.items()}),
        }
        built[name] = (tensors, text.encode(), metadata)
    with files.replace_folder(directory, "the adapter") as tmp:
        for name, (tensors, text, metadata) in built.items():
            out = adapter_dir(tmp, name)
            out.mkdir(exist_ok=True)
            safetensors.torch.save_file(tensors, str(out / WEIGHTS_NAME), metadata=metadata)
            files.write_bytes(out / CONFIG_NAME, text)
    return [adapter_dir(directory, name) for name in names]


# ----------------------------------------------------------------------------- configuration
def _fits(hint: Any, value: Any) -> bool:
    """Whether a JSON ``value`` fits a method field's type ``hint`` (unknown hints fit)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_fits(a, value) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin in (tuple, list) or hint in (tuple, list):
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis or origin is list:
            return all(_fits(args[0], v) for v in value) if args else True
        return not args or (len(args) == len(value) and all(_fits(a, v) for a, v in zip(args, value)))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            return False
        return not args or all(_fits(args[0], k) and _fits(args[1], v) for k, v in value.items())
    return True


def _type_name(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def _checked(method: Method, where: str) -> Method:
    """``method`` if every field holds a value of its declared type (finite numbers), else an
    AdapterFileError naming ``where`` and the field."""
    hints = typing.get_type_hints(type(method))
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if not _fits(hints.get(f.name, Any), value):
            raise AdapterFileError(f"{where}: {method.method_name} option {f.name!r} must be "
                                   f"{_type_name(hints[f.name])} (finite numbers), got {value!r}; "
                                   "fix or remove it in the file")
    return method


def _culprit(config: dict[str, Any]) -> str | None:
    """The field without which ``config`` builds (or fails with a peftlab error instead)."""
    for key in config:
        if key in ("peft_type", "peftlab_method"):
            continue
        try:
            method_from_config({k: v for k, v in config.items() if k != key})
        except PeftlabError:
            return key
        except Exception:
            continue
        return key
    return None


def _check_scalars(config: dict[str, Any], where: Path) -> None:
    """Config fields named like an option of the method they describe, where that option is a
    plain int, float, bool or str, must hold a value of that type (``"r": "8"`` is refused,
    not read as 8)."""
    name = config.get("peftlab_method")
    if name is None:  # peft's file: the method peftlab reads it with
        name = next((n for n in methods() if method_class(n).peft_type == config.get("peft_type")), None)
    if name not in methods():
        return  # the full build reports it
    cls = method_class(name)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if f.name in config and hint in (int, float, bool, str) and not _fits(hint, config[f.name]):
            raise AdapterFileError(f"{where}: field {f.name!r} must be {hint.__name__}"
                                   f"{' (a finite number)' if hint is float else ''}, got {config[f.name]!r}")


_SAVE_FIELDS = ("base_model_name_or_path", "auto_mapping")
"""Fields :func:`save` adds to every config (peft's ``PeftConfig`` has them)."""


def _method_from_config(config: dict[str, Any], where: Path) -> Method:
    for key in ("peft_type", "peftlab_method"):
        if key in config and not isinstance(config[key], str):
            raise AdapterFileError(f"{where}: field {key!r} must be a string, got {config[key]!r}")
    if "peft_type" not in config and "peftlab_method" not in config:
        raise AdapterFileError(f"{where} has no 'peft_type' field; it is not an adapter config (peft's "
                               "adapter_config.json always names its peft_type)")
    _check_scalars(config, where)
    if "peftlab_method" in config:  # peftlab's own config: the fields save() adds for peft are not options
        config = {k: v for k, v in config.items() if k not in _SAVE_FIELDS}
    try:
        method = method_from_config(config)
    except PeftlabError as e:
        raise AdapterFileError(f"{where}: {e}") from None
    except Exception as e:  # a dataclass built from a dict of the wrong types
        field = _culprit(config)
        named = f"field {field!r} ({config[field]!r})" if field else "a field of the wrong type"
        raise AdapterFileError(f"{where}: {named} cannot be used ({type(e).__name__}: {e}); fix or remove it") from None
    return _checked(method, str(where))


def _method_from_header(metadata: dict[str, str], where: Path) -> Method | None:
    if "peftlab_options" not in metadata:
        return None
    name = metadata.get("peftlab_method", "")
    field = f"{where}, header field 'peftlab_options'"
    try:
        options = files.parse_json(metadata["peftlab_options"].encode(), field)
        method = method_class(name).from_options(options)
    except AdapterFileError:
        raise
    except PeftlabError as e:
        raise AdapterFileError(f"{where}: header field 'peftlab_method'/'peftlab_options': {e}") from None
    except Exception as e:
        raise AdapterFileError(f"{field} holds options peftlab cannot use ({type(e).__name__}: {e})") from None
    return _checked(method, field)


def _differences(a: Method, b: Method) -> list[str]:
    if type(a) is not type(b):
        return [f"method: {a.method_name!r} in the header, {b.method_name!r} in the config"]
    x, y = a.options(), b.options()
    return [f"{k}: {x[k]!r} in the header, {y.get(k)!r} in the config" for k in sorted(x) if x[k] != y.get(k)]


def _choose_method(config: dict[str, Any], metadata: dict[str, str], directory: Path) -> Method:
    """The method ``adapter_config.json`` describes (the one source of truth); the header's
    fuller options where the config is exactly the one they were saved with."""
    from_config = _method_from_config(config, directory / CONFIG_NAME)
    from_header = _method_from_header(metadata, directory / WEIGHTS_NAME)
    if from_header is None:
        return from_config
    if metadata.get("peftlab_config_sha256") == _config_digest(config):
        return from_header
    differ = _differences(from_header, from_config)
    if differ:
        warnings.warn(f"{directory / CONFIG_NAME} is not the config peftlab saved with these weights (edited "
                      f"since, or written by another tool); following it, as peft does. The weights' header "
                      f"differs in: {'; '.join(differ[:6])}", UserWarning, stacklevel=3)
    return from_config


# ----------------------------------------------------------------------------- load
def _meta_copy(model: nn.Module) -> nn.Module | None:
    """A copy of ``model`` whose parameters and buffers are on the meta device (no memory), or
    None where the model cannot be copied."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    try:
        return copy.deepcopy(model, memo)
    except Exception:  # a model holding something deepcopy refuses: check after the real attach
        return None


def _expected(model: nn.Module, method: Method, name: str, directory: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
    """``{canonical file key: (shape, dtype)}`` of what the adapter ``method`` on ``model``
    saves, from an attach to a meta-device copy (no allocation); None if no copy can be made."""
    from peftlab.api import attach

    clone = _meta_copy(model)
    if clone is None:
        return None
    try:
        attach(clone, method, name, activate=False)
        return {_canonical(k): (tuple(t.shape), t.dtype) for k, (_, t) in file_tensors(clone, name).items()}
    except Exception as e:
        raise AdapterFileError(f"the adapter in {directory} does not fit {type(model).__name__}: {e}") from None


def _report(directory: Path, model: nn.Module, missing: list[str], unexpected: list[str], misshaped: list[str],
            dtypes: list[str]) -> None:
    parts = [f"{label} ({len(keys)}): {keys[:8]}{' ...' if len(keys) > 8 else ''}"
             for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("mis-shaped keys", misshaped), ("wrong dtypes", dtypes)) if keys]
    if parts:
        raise AdapterFileError(f"{directory / WEIGHTS_NAME} does not match the adapter built from its config on "
                               f"{type(model).__name__}: " + "; ".join(parts))


def _compare(entries: dict[str, files.TensorInfo], expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
             model: nn.Module, directory: Path) -> list[str]:
    """Check the header's keys, shapes and dtypes against ``expected``; return the file keys
    that the adapter does not have but that may be copies of base weights (checked by value)."""
    by_canon = {_canonical(k): k for k in entries}
    twice = sorted(k for k in entries if by_canon[_canonical(k)] != k)
    if twice:
        _report(directory, model, [], [f"{k} (the same tensor as {by_canon[_canonical(k)]})" for k in twice
                                       if entries[k].shape != entries[by_canon[_canonical(k)]].shape], [], [])
    missing = sorted(set(expected) - set(by_canon))
    extra = sorted(by_canon[k] for k in set(by_canon) - set(expected))
    state = model.state_dict()
    maybe_base = [k for k in extra if (b := state.get(_canonical(k).removeprefix(FILE_PREFIX))) is not None
                  and tuple(b.shape) == entries[k].shape]
    unexpected = [k for k in extra if k not in maybe_base]
    misshaped, dtypes = [], []
    for canon in sorted(set(expected) & set(by_canon)):
        info, (shape, dtype) = entries[by_canon[canon]], expected[canon]
        if info.shape != shape:
            misshaped.append(f"{by_canon[canon]}: file {info.shape} vs model {shape}")
        elif info.dtype.is_floating_point != dtype.is_floating_point or (
                not dtype.is_floating_point and info.dtype != dtype):
            dtypes.append(f"{by_canon[canon]}: file {info.dtype} vs model {dtype}")
    _report(directory, model, missing, unexpected, misshaped, dtypes)
    return maybe_base


def _read_tensors(fd: int, entries: dict[str, files.TensorInfo], start: int, metadata: dict[str, str],
                  where: Path) -> dict[str, torch.Tensor]:
    tensors, raw = {}, {}
    try:
        for key, info in entries.items():
            tensors[key], raw[key] = files.read_tensor(fd, info, start)
    except OSError as e:
        raise AdapterFileError(f"{where} could not be read ({e}); it was not loaded") from None
    want = metadata.get("peftlab_data_sha256")
    if want is not None and _data_digest(raw) != want:
        raise AdapterFileError(f"{where}: the tensor data does not match the checksum in its header "
                               "(peftlab_data_sha256): the file was damaged or changed after it was saved; "
                               "save the adapter again")
    return tensors


def _not_base_copies(model: nn.Module, keys: list[str], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Of ``keys``, those that are not copies of unchanged base weights (peft saves embedding
    weights alongside embedding adapters)."""
    state = model.state_dict()
    rest = []
    for key in keys:
        base = state.get(_canonical(key).removeprefix(FILE_PREFIX))
        if base is None or base.device.type == "meta" or not torch.equal(base.to(tensors[key].dtype), tensors[key]):
            rest.append(key)
    return rest


def _opened(directory: Path, fds: dict[str, int | None]) -> tuple[int, int]:
    config_fd, weights_fd = fds[CONFIG_NAME], fds[WEIGHTS_NAME]
    if weights_fd is None:
        pickled = sorted(n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth", ".pkl")))
        hint = (f" It holds {pickled}: pickle files are never loaded (they can run code). Convert them to "
                "safetensors where you trust them, e.g. with safetensors.torch.save_file.") if pickled else ""
        raise AdapterFileError(f"{directory} has no {WEIGHTS_NAME}.{hint}")
    if config_fd is None:
        raise AdapterFileError(f"{directory} has no {CONFIG_NAME}; an adapter folder holds {CONFIG_NAME} and "
                               f"{WEIGHTS_NAME}")
    return config_fd, weights_fd


_LIMITS: dict[str, int | None] = {CONFIG_NAME: files.JSON_LIMIT, WEIGHTS_NAME: None}


def _parse_folder(directory: Path, fds: dict[str, int | None]) -> tuple[Method, dict[str, files.TensorInfo],
                                                                         dict[str, str], int, int]:
    config_fd, weights_fd = _opened(directory, fds)
    try:
        text = files.read_fd(config_fd, os.fstat(config_fd).st_size)
    except OSError as e:
        raise AdapterFileError(f"{directory / CONFIG_NAME} could not be read ({e})") from None
    config = files.parse_json(text, str(directory / CONFIG_NAME))
    entries, metadata, start = files.safetensors_header(weights_fd, directory / WEIGHTS_NAME)
    method = _choose_method(config, metadata, directory)
    method = method.for_file({k: e.shape for k, e in entries.items()}, str(directory / WEIGHTS_NAME))
    return method, entries, metadata, start, weights_fd


def read(directory: str | os.PathLike[str]) -> tuple[Method, dict[str, torch.Tensor], dict[str, str]]:
    """Read one adapter folder without a model: its method, its tensors by file key, and the
    header's metadata (with every check that needs no model)."""
    d = Path(directory)
    with files.open_files(d, (CONFIG_NAME, WEIGHTS_NAME), _LIMITS) as fds:
        method, entries, metadata, start, weights_fd = _parse_folder(d, fds)
        return method, _read_tensors(weights_fd, entries, start, metadata, d / WEIGHTS_NAME), metadata


def _check_architecture(model: nn.Module, metadata: dict[str, str], directory: Path) -> None:
    if "peftlab_base" not in metadata:
        return
    want = files.parse_json(metadata["peftlab_base"].encode(), f"{directory / WEIGHTS_NAME}, header field "
                            "'peftlab_base'")
    have = _architecture(model)
    if not all(isinstance(want.get(k, ""), str) for k in ("model_type", "model_class")):
        raise AdapterFileError(f"{directory / WEIGHTS_NAME}, header field 'peftlab_base': model_type and "
                               f"model_class must be strings, got {want!r}")
    if want.get("model_type") and have["model_type"] and want["model_type"] != have["model_type"]:
        raise AdapterFileError(
            f"{directory} was trained on a {want['model_type']!r} model ({want.get('model_class')}), "
            f"but this model is {have['model_type']!r} ({have['model_class']}); load it onto the "
            "architecture it was trained on")


def load(model: nn.Module, directory: str | os.PathLike[str], name: str = DEFAULT, *,
         trainable: bool = False, activate: bool = True) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``model`` under ``name``.

    Reads files written by peftlab or by peft. Everything is checked before the model is
    touched (see the module's docstring); on any problem the model is left exactly as it was
    and the :class:`AdapterFileError` names the file and what is wrong.
    """
    from peftlab.api import attach, use

    slots.check_name(name)
    if name in (model.__dict__.get("peftlab").adapters if slots.has_adapters(model) else {}):
        raise AdapterStateError(f"the model already has an adapter named {name!r}; load under another name "
                               "or peftlab.detach it first")
    d = Path(directory)
    with files.open_files(d, (CONFIG_NAME, WEIGHTS_NAME), _LIMITS) as fds:
        method, entries, metadata, start, weights_fd = _parse_folder(d, fds)
        _check_architecture(model, metadata, d)
        expected = _expected(model, method, name, d)
        maybe_base = _compare(entries, expected, model, d) if expected is not None else []
        tensors = _read_tensors(weights_fd, entries, start, metadata, d / WEIGHTS_NAME)
    _report(d, model, [], _not_base_copies(model, maybe_base, tensors), [], [])

    with transaction(model):  # the model is exactly as before if anything below fails
        try:
            attach(model, method, name, trainable=trainable, activate=False)
        except PeftlabError as e:
            raise AdapterFileError(f"the adapter in {directory} does not fit {type(model).__name__}: {e}") from e
        table = {_canonical(k): v for k, v in file_tensors(model, name).items()}
        by_canon = {_canonical(k): k for k in tensors}
        if expected is None:  # no meta copy: the same checks, after the attach
            maybe_base = _compare(entries, {k: (tuple(t.shape), t.dtype) for k, (_, t) in table.items()}, model, d)
            _report(d, model, [], _not_base_copies(model, maybe_base, tensors), [], [])
        if any(t.device.type == "meta" for _, t in table.values()):
            raise AdapterFileError("cannot load values into a model on the meta device; "
                                   "materialise it first (e.g. model.to_empty(device='cpu'))")
        method.load_file_tensors(model, name, {key: (t, tensors[by_canon[key]]) for key, (_, t) in table.items()})
        if activate:
            use(model, name)
    return model


def hotswap(model: nn.Module, directory: str | os.PathLike[str], name: str = DEFAULT) -> nn.Module:
    """Replace the weights of adapter ``name`` in place by the adapter saved in ``directory``
    (peftlab's or peft's files), with no re-attach: the same parameter objects take the new
    values, so optimizers, hooks and a ``torch.compile``'d model keep working without recompiling.

    The file must be an adapter of the same method on the same modules. LoRA takes any ranks and
    alphas up to what :func:`peftlab.prepare_hotswap` prepared (or exactly its own otherwise);
    other methods the same config. Every check runs before any write; on any problem the model is
    unchanged and the :class:`AdapterFileError` says what differs."""
    s = slots.slot(model, name)
    d = Path(directory)
    if s.base_keys:
        raise AdapterStateError(f"adapter {name!r} trains base tensors in place; hot-swapping them is not supported "
                                "(peftlab.load the new adapter under another name)")
    merged = [p for p, layer in adapter_layers(model) if name in getattr(layer, "peftlab_merged", ())]
    if merged:
        raise AdapterStateError(f"adapter {name!r} is merged (e.g. {merged[0]}); peftlab.unmerge(model) first")
    method, tensors, metadata = read(d)
    _check_architecture(model, metadata, d)
    if type(method) is not type(s.method):
        raise AdapterFileError(f"{d} holds a {method.method_name} adapter and adapter {name!r} is "
                               f"{s.method.method_name}; a hot-swap keeps the method (peftlab.load it as a new adapter)")
    table = {_canonical(k): v for k, v in file_tensors(model, name).items()}
    by_canon = {_canonical(k): k for k in tensors}
    missing, unexpected = sorted(set(table) - set(by_canon)), sorted(set(by_canon) - set(table))
    if missing or unexpected:
        raise AdapterFileError(f"{d} does not fit adapter {name!r}: missing {missing[:3]}"
                               f"{' ...' if len(missing) > 3 else ''} ({len(missing)}), unexpected {unexpected[:3]}"
                               f"{' ...' if len(unexpected) > 3 else ''} ({len(unexpected)}); a hot-swap needs an "
                               "adapter on the same modules (peftlab.load it as a new adapter)")
    values = {k: (t, tensors[by_canon[k]]) for k, (_, t) in table.items()}
    try:
        writes, record = s.method.hotswap_writes(model, name, method, values)
    except ConfigError as e:
        raise AdapterFileError(f"{d} cannot be hot-swapped into adapter {name!r}: {e}") from e
    with transaction(model), torch.no_grad():
        for target, value in writes:
            before_write(target)
            target.copy_(value.to(dtype=target.dtype, device=target.device))
        s.method = record
    return model
