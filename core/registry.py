"""Name -> class registries for stages, exporters and devices (Olive's passes, in small)."""

from __future__ import annotations

import importlib
from typing import Generic, TypeVar

from .errors import InputError

T = TypeVar("T")


class Registry(Generic[T]):
    """`plugins`: the packages whose import registers the entries, imported the first time a name is looked up,
    so a lower floor can ask for a higher one's entry (the prune planner for an exporter's predicted size)
    without importing it."""

    def __init__(self, kind: str, plugins: tuple[str, ...] = ()):
        self.kind = kind
        self.plugins = plugins
        self._items: dict[str, T] = {}
        self._loaded = not plugins

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for package in self.plugins:
                importlib.import_module(package)

    def register(self, name: str):
        def add(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load()
        if name not in self._items:
            known = ", ".join(sorted(self._items)) or "none"
            raise InputError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self._load()
        return name in self._items


STAGES: Registry = Registry("stage")
EXPORTERS: Registry = Registry("exporter", plugins=("vcompress.exporters",))
DEVICES: Registry = Registry("device", plugins=("vcompress.devices",))
