"""PEP 562 lazy names for a package `__init__`: a name is imported from its submodule on first use."""

from __future__ import annotations

from importlib import import_module

__all__ = ["lazy_getattr"]


def lazy_getattr(package: str, table: dict[str, str], namespace: dict):
    """A module `__getattr__` that imports `name` from `table[name]` (relative to `package`) on first use
    and caches it in `namespace` (the package's globals())."""

    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = table[name]
        value = getattr(
            import_module(module, package) if module.startswith(".") else import_module(module), name
        )
        namespace[name] = value
        return value

    return __getattr__
