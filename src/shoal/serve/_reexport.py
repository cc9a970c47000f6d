"""How each `shoal.serve.<module>` mirrors `ray.serve.<module>`: it copies the public names from the
shoal modules that implement them.

Names are listed per module; one that its module does not define (yet) is left out, and the copy
records it in `MISSING`, so `from shoal.serve.config import X` fails for it as for any missing name
while the rest of the module works. A listed module that does not exist counts the same.
"""

from __future__ import annotations

import importlib
from typing import Iterable, Union

# "<shoal.serve module>" -> names it lists that no shoal module defines (see tests/test_ray_parity_surface.py).
MISSING: dict[str, list[str]] = {}


def reexport(namespace: dict, sources: dict[str, Iterable[Union[str, tuple[str, str]]]]) -> list[str]:
    """Copy into `namespace` each listed name (or `(public_name, name_in_module)`) its module has;
    return the public names copied (the module's `__all__`)."""
    exported: list[str] = []
    missing = MISSING.setdefault(namespace["__name__"], [])
    for module_name, names in sources.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:  # the module exists but one of its own imports failed: a real error
                raise
            module = None
        for entry in names:
            public, own = (entry, entry) if isinstance(entry, str) else entry
            if public in exported:
                continue  # an earlier source had it
            if module is not None and hasattr(module, own):
                namespace[public] = getattr(module, own)
                exported.append(public)
                if public in missing:
                    missing.remove(public)
            elif public not in missing:
                missing.append(public)
    return exported
