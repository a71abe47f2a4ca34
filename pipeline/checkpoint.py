"""Atomic, checksummed training checkpoints.

A checkpoint is written to a temporary name, fsynced and renamed; only then is the manifest
(`latest.json`, itself replaced atomically) updated with its SHA-256. A process killed at any
moment leaves either the previous checkpoint or the new one, never a half-written file that
`load` would pick. Loading uses `weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

from mtrank.features.base import MtrankError

import contextlib
import errno
import hashlib
import io
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from mtrank.features import storage

MANIFEST = "latest.json"


class CheckpointError(MtrankError, RuntimeError):
    pass


def load_tensors(path: str | Path) -> object:
    """A torch file of tensors and plain containers, never code: `weights_only=True`, and a file that
    holds other pickled objects (or is not a torch file) is one clear CheckpointError naming it."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).split(".")[0]
        raise CheckpointError(f"{path}: refused to load: it holds pickled Python objects, not only tensors "
                              f"({first}); mtrank loads weights with weights_only=True and never runs code "
                              "from a file") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot be read as a torch weights file ({str(e).splitlines()[0][:200]})") \
            from None


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointStore:
    """A directory of `step-<n>.pt` files; the manifest lists the newest `keep` with checksums."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.dir = Path(directory)
        self.keep = max(1, keep)

    def _manifest(self) -> list[dict]:
        path = self.dir / MANIFEST
        if not path.exists():
            return []
        try:
            return json.loads(path.read_text())["checkpoints"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: unreadable checkpoint manifest ({e})") from None

    def save(self, state: dict, step: int) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / f"step-{step:09d}.pt"
        write_atomic(final, lambda f: torch.save(state, f))
        entry = {"file": final.name, "step": step, "sha256": sha256(final), "bytes": final.stat().st_size}
        entries = [e for e in self._manifest() if e["file"] != final.name] + [entry]
        entries.sort(key=lambda e: e["step"])
        kept, dropped = entries[-self.keep:], entries[:-self.keep]
        write_atomic(self.dir / MANIFEST, json.dumps({"checkpoints": kept}, indent=1).encode())
        _fsync_dir(self.dir)
        for e in dropped:  # only after the manifest no longer names them
            (self.dir / e["file"]).unlink(missing_ok=True)
        return final

    def load_latest(self) -> dict | None:
        """The newest checkpoint whose checksum matches; None when there is none at all."""
        path = self.latest()
        return None if path is None else self.load(path)

    @staticmethod
    def load(path: str | Path) -> dict:
        return load_tensors(path)

    def latest(self) -> str | None:
        """Path of the newest checkpoint whose checksum matches; None when there is none at all.

        A listed file that is missing or fails its checksum is skipped for the one before it; if
        every listed checkpoint is broken that is an error, not a silent fresh start.
        """
        entries = self._manifest()
        problems = []
        for e in reversed(entries):
            path = self.dir / e["file"]
            if not path.exists():
                problems.append(f"{path.name}: missing")
                continue
            if sha256(path) != e["sha256"]:
                problems.append(f"{path.name}: checksum mismatch")
                continue
            return str(path)
        if problems:
            raise CheckpointError(f"{self.dir}: no intact checkpoint ({'; '.join(problems)})")
        return None
