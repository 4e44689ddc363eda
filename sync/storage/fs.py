"""``fs``: the embedded default backend, a directory tree on a local (or shared POSIX)
filesystem.

Every write is durable before it returns: data is fsynced, then made visible with a
*hard link* (``os.link``), which fails when the target exists. That makes blob and entry
writes conditional and atomic, so several ingest servers may share one directory.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from pydantic import Field

from ..errors import StorageError
from . import register
from .base import Storage, StorageOptions, blob_key


class FsOptions(StorageOptions):
    root: str = Field(default="ingest-data", description="directory that holds the store")
    fsync: bool = Field(default=True, description="fsync files and directories (keep on)")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@register("fs")
class FsStorage(Storage):
    Options = FsOptions
    options: FsOptions

    def __init__(self, options: FsOptions):
        super().__init__(options)
        self.root = Path(options.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {self.root}: {e.strerror}") from None

    def describe(self) -> str:
        return f"fs:{self.root}"

    def _path(self, key: str) -> Path:
        # keys are built from validated ids; refuse anything that could leave the root
        if key.startswith("/") or ".." in key.split("/") or "\\" in key:
            raise StorageError(f"refusing key {key!r}")
        return self.root / key

    def _sync(self, fd_or_dir: int | Path) -> None:
        if not self.options.fsync:
            return
        if isinstance(fd_or_dir, Path):
            _fsync_dir(fd_or_dir)
        else:
            os.fsync(fd_or_dir)

    def _write_tmp(self, directory: Path, data: bytes) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            self._sync(f.fileno())
        return tmp

    def _link_if_absent(self, tmp: Path, dst: Path) -> bool:
        try:
            os.link(tmp, dst)
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self._sync(dst.parent)
        return True

    # -- blobs ---------------------------------------------------------------------------
    def has_blob(self, sha256: str) -> bool:
        return self._path(blob_key(sha256)).is_file()

    def put_blob(self, sha256: str, src: Path, size: int) -> bool:
        dst = self._path(blob_key(sha256))
        try:
            if dst.exists():
                return False
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.parent / f".tmp-{uuid.uuid4().hex}"
            try:
                os.link(src, tmp)  # same filesystem: no copy
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                with open(src, "rb") as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, 4 << 20)
                    fout.flush()
                    self._sync(fout.fileno())
            if tmp.stat().st_size != size:
                tmp.unlink(missing_ok=True)
                raise StorageError(f"blob {sha256[:12]}: staged size != {size}")
            return self._link_if_absent(tmp, dst)
        except OSError as e:
            raise StorageError(f"cannot store blob {sha256[:12]} in {self.root}: "
                               f"{e.strerror}") from None

    def read_blob(self, sha256: str) -> Iterator[bytes]:
        try:
            with open(self._path(blob_key(sha256)), "rb") as f:
                while block := f.read(4 << 20):
                    yield block
        except OSError as e:
            raise StorageError(f"cannot read blob {sha256[:12]}: {e.strerror}") from None

    def list_blobs(self) -> Iterator[str]:
        base = self.root / "blobs"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if sub.is_dir():
                for f in sorted(sub.iterdir()):
                    if not f.name.startswith("."):
                        yield f.name

    # -- small objects -------------------------------------------------------------------
    def get_object(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError(f"cannot read {key}: {e.strerror}") from None

    def put_object(self, key: str, data: bytes) -> None:
        dst = self._path(key)
        try:
            tmp = self._write_tmp(dst.parent, data)
            os.replace(tmp, dst)
            self._sync(dst.parent)
        except OSError as e:
            raise StorageError(f"cannot write {key}: {e.strerror}") from None

    def put_object_if_absent(self, key: str, data: bytes) -> bool:
        dst = self._path(key)
        try:
            return self._link_if_absent(self._write_tmp(dst.parent, data), dst)
        except OSError as e:
            raise StorageError(f"cannot write {key}: {e.strerror}") from None

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self._path(prefix.rstrip("/")) if prefix.rstrip("/") else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in files:
                if not name.startswith("."):
                    key = f"{rel}/{name}" if rel != "." else name
                    if key.startswith(prefix):
                        yield key
