"""A registry of plug-in classes by key, with built-ins imported lazily on first use.

Used for drivers (``camera.opencv`` …) and storage backends (``fs``, ``s3``): a
deployment that never names a backend never imports its library; tests register fakes
with :meth:`LazyRegistry.register` exactly like the real ones.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

T = TypeVar("T", bound=type)


class LazyRegistry(Generic[T]):
    """``what`` names the kind in error messages; ``builtin`` maps key → module that
    registers it when imported; ``attr`` is the class attribute set to the key."""

    def __init__(self, what: str, builtin: dict[str, str], attr: str = "key"):
        self.what = what
        self.builtin = builtin
        self.attr = attr
        self._classes: dict[str, T] = {}

    def register(self, key: str) -> Callable[[T], T]:
        """Class decorator: make ``cls`` available under ``key`` (sets ``cls.<attr>``)."""

        def deco(cls: T) -> T:
            setattr(cls, self.attr, key)
            self._classes[key] = cls
            return cls

        return deco

    def known_keys(self) -> list[str]:
        return sorted(set(self.builtin) | set(self._classes))

    def get(self, key: str) -> T:
        """The class for ``key``; raises KeyError naming the known keys."""
        if key not in self._classes and key in self.builtin:
            importlib.import_module(self.builtin[key])
        try:
            return self._classes[key]
        except KeyError:
            raise KeyError(f"unknown {self.what} {key!r}; known: "
                           f"{', '.join(self.known_keys())}") from None
