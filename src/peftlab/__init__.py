"""peftlab: parameter-efficient fine-tuning methods under one small API.

    import peftlab
    peftlab.attach(model, "lora", r=8, target_modules=["q_proj", "v_proj"])
    ...train...
    peftlab.save(model, "out/")            # adapter_config.json + adapter_model.safetensors
    peftlab.load(fresh_model, "out/")      # also reads adapters written by peft
    peftlab.merge_and_unload(model)        # a plain model again, update folded in
"""

from __future__ import annotations

__version__ = "0.1.0"

# The built-in methods register on import. Imported first, because importing the subpackage
# binds ``peftlab.methods`` to it; the ``methods()`` function below takes the name back.
import peftlab.methods as _builtin_methods  # noqa: E402,F401

from peftlab.api import (
    active,
    adapter_parameters,
    adapters,
    attach,
    detach,
    disabled,
    merge,
    merge_and_unload,
    per_row,
    prepare_hotswap,
    unmerge,
    use,
)
from peftlab.core.errors import (
    AdapterFileError,
    AdapterStateError,
    ConfigError,
    NonFiniteError,
    PeftlabError,
    TargetError,
)
from peftlab.core.method import Method, get_method, method_class, methods, register
from peftlab.core.state import hotswap, load, save
from peftlab.core.summary import Summary, summary

__all__ = [
    "AdapterFileError",
    "AdapterStateError",
    "ConfigError",
    "NonFiniteError",
    "Method",
    "PeftlabError",
    "Summary",
    "TargetError",
    "__version__",
    "active",
    "adapter_parameters",
    "adapters",
    "attach",
    "detach",
    "disabled",
    "get_method",
    "hotswap",
    "load",
    "merge",
    "merge_and_unload",
    "method_class",
    "methods",
    "per_row",
    "prepare_hotswap",
    "register",
    "save",
    "summary",
    "unmerge",
    "use",
]
