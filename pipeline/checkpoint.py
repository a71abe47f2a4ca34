"""Atomic, checksummed training checkpoints.

A checkpoint is written to a temporary name, fsynced and renamed; only then is the manifest
(`latest.json`, itself replaced atomically) updated with its SHA-256. A process killed at any
moment leaves either the previous checkpoint or the new one, never a half-written file that
`load` would pick. Loading uses `weights_only=True`: a checkpoint is data, never code.
"""
from __future__ import annotations

from mtrank.features.base import MtrankError

import json
import os
from pathlib import Path

import torch

from mtrank.pipeline.output_files import sha256, write_atomic

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
