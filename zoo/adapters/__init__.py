"""Adapter registry. Every module in this package registers its method on import.

Adding a method = adding ``zoo/adapters/<name>.py`` with a class decorated by
``@register_adapter("<name>")``; nothing else needs editing.
"""
from __future__ import annotations

import importlib
import pkgutil

from zoo.registry import Registry

ADAPTERS: Registry = Registry("adapter")


def register_adapter(name: str):
    def deco(cls):
        cls.name = name
        return ADAPTERS.register(name)(cls)

    return deco


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_discover()
