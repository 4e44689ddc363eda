"""Copies byte ranges of segment files into export files, in the kernel where it can
(``os.copy_file_range``), else with plain reads and writes; makes hard links to them.

Used in two ways, with no import of the rest of edgecap (so that it starts in
milliseconds): :class:`~agent.export.common.FileWriter` calls :func:`copy_range` and
:func:`hard_link` on its threads, and runs this file as a helper process
(``python -I -S _copier.py``) that does the same for the jobs it reads on stdin, so that
the copies do not wait for the GIL of the exporting process (every file costs a writer
thread a few GIL hand-overs, and the exporting thread holds the GIL while it decodes).

Helper protocol: stdin carries jobs, each a 4-byte little-endian length and that many
bytes of NUL-separated fields: ``c, source, destination, offset, length`` (copy) or
``l, existing, path`` (hard link to a file copied before by this helper). At the end of
stdin the helper finishes every job and writes to stdout one line per failed job:
``kind NUL errno NUL message NUL file`` (``kind``: ``truncated`` or ``os``).
"""

from __future__ import annotations

import errno
import os
import sys
import threading

#: copy_file_range errors that mean "not here" (old kernel, file system, seccomp)
NO_COPY = {errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


class Truncated(EOFError):
    """The source file ends before the range (truncated while exporting?)."""

    @classmethod
    def at(cls, src_name: str, off: int) -> "Truncated":
        return cls(f"{os.path.basename(src_name)} ends before offset {off} "
                   "(truncated while exporting?)")


class CopyState:
    """Whether the kernel copies (cleared at the first "not here" error); shared by the
    threads of one writer."""

    def __init__(self) -> None:
        self.kernel_copy = hasattr(os, "copy_file_range")


def copy_range(src: int, src_name: str, path: str, offset: int, length: int,
               state: CopyState) -> None:
    """Write ``length`` bytes of ``src`` from ``offset`` into a new file ``path``."""
    dst = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        off, left = offset, length
        while left and state.kernel_copy:
            try:
                n = os.copy_file_range(src, dst, left, off)
            except OSError as e:
                if e.errno not in NO_COPY or left != length:
                    raise
                state.kernel_copy = False
                break
            if n == 0:
                raise Truncated.at(src_name, off)
            off += n
            left -= n
        while left:
            b = os.pread(src, min(left, 1 << 22), off)
            if not b:
                raise Truncated.at(src_name, off)
            view = memoryview(b)
            while view:
                view = view[os.write(dst, view):]
            off += len(b)
            left -= len(b)
    finally:
        os.close(dst)


def hard_link(existing: str, path: str) -> None:
    """``path`` a hard link to ``existing`` (replacing a file there), or a copy where the
    file system has no hard links."""
    try:
        os.link(existing, path)
    except FileExistsError:
        os.unlink(path)
        os.link(existing, path)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        import shutil

        shutil.copyfile(existing, path)


class Links:
    """Hard links to files being written, each made by the thread that finishes its file
    (or at once when it is done): no thread waits for another's copy."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._done: set[str] = set()
        self._waiting: dict[str, list[str]] = {}

    def link(self, existing: str, path: str) -> None:
        """``path`` a hard link to ``existing`` (its folder made), now or once written."""
        with self._lock:
            if existing not in self._done:
                self._waiting.setdefault(existing, []).append(path)
                return
        _make_link(existing, path)

    def written(self, path: str) -> None:
        """``path`` is written: make the links that wait for it."""
        with self._lock:
            self._done.add(path)
            waiting = self._waiting.pop(path, ())
        for link in waiting:
            _make_link(path, link)


def _make_link(existing: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    hard_link(existing, path)


def _serve(threads: int) -> None:
    """The helper process (module doc)."""
    import queue

    jobs: queue.SimpleQueue = queue.SimpleQueue()
    state = CopyState()
    sources: dict[str, int] = {}
    lock = threading.Lock()
    links = Links()
    failed: list[str] = []

    def work() -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            try:
                if job[0] == "c":
                    _, src, dst, off, n = job
                    with lock:
                        fd = sources.get(src)
                        if fd is None:
                            fd = sources[src] = os.open(src, os.O_RDONLY)
                    copy_range(fd, src, dst, int(off), int(n), state)
                    links.written(dst)
                else:
                    links.link(job[1], job[2])
            except Truncated as e:
                failed.append(f"truncated\0\0{e}\0{job[2]}")
            except OSError as e:
                failed.append(f"os\0{e.errno or 0}\0{e.strerror or e}\0{e.filename or job[2]}")

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    inp = sys.stdin.buffer
    while True:
        head = inp.read(4)
        if len(head) < 4:
            break
        body = inp.read(int.from_bytes(head, "little"))
        jobs.put(os.fsdecode(body).split("\0"))
    for _ in pool:
        jobs.put(None)
    for t in pool:
        t.join()
    for fd in sources.values():
        os.close(fd)
    sys.stdout.write("".join(f + "\n" for f in failed))
    sys.stdout.flush()


if __name__ == "__main__":
    _serve(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
