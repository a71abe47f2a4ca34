"""Outputs written whole or not at all: a temporary name, fsync, rename (or one object-store PUT).

Every job writes through these (scores, reports, summaries, checkpoints), so an interrupted run never
leaves a half-written file under a final name. No torch here: the data-only commands (`validate`,
`exposures`, `report`) import this without loading torch.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
from pathlib import Path
from typing import BinaryIO, Callable

from mtrank.features import storage
from mtrank.features.base import MtrankError


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class OutputError(MtrankError, OSError):
    """An output could not be written (disk full, file too large, not a directory, ...): names the
    path and the OS error; nothing is left under the final name."""

    def __init__(self, path: Path | str, err: OSError):
        code = errno.errorcode.get(err.errno, "") if err.errno else ""
        super().__init__(err.errno, f"cannot write {path}: {err.strerror or err}" + (f" [{code}]" if code else "")
                         + " (nothing was written under that name)")
        self.path = str(path)

    def __str__(self) -> str:
        return self.strerror


def make_dirs(path: Path | str) -> Path:
    """`mkdir -p` for an output folder, failing with an OutputError that names it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(path, e) from e
    return path


def write_atomic(path: Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """Write to a hidden temporary name, fsync, rename: readers see the old file or the new one.

    `data` is the bytes, or a function that writes into the open file (torch.save streams large
    state without a second copy in memory). A failed write (disk full, ...) removes the temporary
    file and raises OutputError naming `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(path, e) from e
        raise


def write_output(target: str | Path, data: bytes | Callable[[BinaryIO], object]) -> None:
    """An output at a local path (write_atomic) or an object-store URI (s3://bucket/key).

    On an object store the complete object is PUT under its final key in one upload, with no
    temporary key and no rename: an object only becomes visible once its upload completes, so a
    reader sees the previous object or the whole new one (features/storage.put). A failure is an
    OutputError naming the URI."""
    if not storage.is_uri(target):
        write_atomic(Path(target), data)
        return
    if callable(data):
        buf = io.BytesIO()
        data(buf)
        data = buf.getvalue()
    try:
        storage.put(str(target), data)
    except OSError as e:
        raise OutputError(target, OSError(storage.one_line(e))) from None


def check_output(target: str | Path) -> None:
    """Fail before any work when an output cannot be written: its local folder is created (make_dirs),
    an object store's bucket must exist."""
    if not storage.is_uri(target):
        make_dirs(Path(target).parent)
        return
    try:
        storage.check_bucket(str(target))
    except OSError as e:
        raise OutputError(target, OSError(storage.one_line(e))) from None


def write_atomic_all(files: dict[Path, bytes]) -> None:
    """Several files that belong together (a report and its metrics): every one is written to its
    temporary name first, and only when all of them are complete are they renamed into place."""
    tmps: list[Path] = []
    try:
        for path, data in files.items():
            tmp = path.with_name(f".{path.name}.tmp")
            tmps.append(tmp)
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as e:
                raise OutputError(path, e) from e
        for tmp, path in zip(tmps, files):
            os.replace(tmp, path)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
