"""Storage backends of the ingest server (fleet side), behind one small interface
(:mod:`sync.storage.base`). Keys such as ``fs`` and ``s3`` map to classes; built-ins are
imported lazily (an fs-only server never imports boto3) and tests register fakes with
:func:`register` exactly like the real ones."""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

from .base import Storage, StorageOptions

S = TypeVar("S", bound=type[Storage])

#: key -> module that registers it when imported
BUILTIN: dict[str, str] = {
    "fs": "sync.storage.fs",
    "s3": "sync.storage.s3",
}

_REGISTRY: dict[str, type[Storage]] = {}


def register(key: str) -> Callable[[S], S]:
    """Class decorator: make ``cls`` available as ``[storage] backend = key``."""

    def deco(cls: S) -> S:
        cls.key = key
        _REGISTRY[key] = cls
        return cls

    return deco


def known_keys() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get(key: str) -> type[Storage]:
    """The Storage class for ``key``; raises KeyError naming the known keys."""
    if key not in _REGISTRY and key in BUILTIN:
        importlib.import_module(BUILTIN[key])
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"unknown storage backend {key!r}; known: "
                       f"{', '.join(known_keys())}") from None


def create(key: str, options: dict[str, Any] | StorageOptions) -> Storage:
    """Build a backend from its key and its (validated or raw) options."""
    cls = get(key)
    if not isinstance(options, cls.Options):
        options = cls.Options.model_validate(options)
    return cls(options)


__all__ = ["Storage", "StorageOptions", "register", "get", "create", "known_keys"]
