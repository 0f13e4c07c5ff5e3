"""Built-in methods: importing this package registers them.

Every module of this package is one method (or one family sharing a layer type) and registers
itself with ``@register``; they are imported in name order, so adding a method is adding a file.
Modules whose name starts with ``_`` are helpers, not methods, and are not imported here.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
