"""Storage backends of the ingest server (fleet side), behind one small interface
(:mod:`sync.storage.base`). Keys such as ``fs`` and ``s3`` map to classes; built-ins are
imported lazily (an fs-only server never imports boto3) and tests register fakes with
:func:`register` exactly like the real ones."""

from __future__ import annotations

from typing import Any

from agent.registry import LazyRegistry

from .base import Storage, StorageOptions

#: key -> module that registers it when imported
BUILTIN: dict[str, str] = {
    "fs": "sync.storage.fs",
    "s3": "sync.storage.s3",
}

_REGISTRY: LazyRegistry[type[Storage]] = LazyRegistry("storage backend", BUILTIN)

#: ``@register("fs")`` makes a Storage class available as ``[storage] backend = "fs"``
register = _REGISTRY.register
known_keys = _REGISTRY.known_keys
#: the Storage class for a key; raises KeyError naming the known keys
get = _REGISTRY.get


def create(key: str, options: dict[str, Any] | StorageOptions) -> Storage:
    """Build a backend from its key and its (validated or raw) options."""
    cls = get(key)
    if not isinstance(options, cls.Options):
        options = cls.Options.model_validate(options)
    return cls(options)


__all__ = ["Storage", "StorageOptions", "register", "get", "create", "known_keys"]
