"""Featurize once: the hashed and transformed rows of a window, kept for the epochs after the first.

Hashing, validation and the numeric transforms cost more than a step of a small model, and they give
the same arrays every epoch. A `FeatureCache` holds them:

- in memory, when the window's featurized rows fit `budget_bytes`: the first `batches()` call reads
  the whole shard once, and every epoch (the first included) is one permutation of *all* its rows,
  so a small window is shuffled across its days rather than a buffer at a time;
- on disk (`directory`), when they do not: the first epoch streams as before and writes its
  featurized chunks; later epochs read the chunks back and shuffle them through the reader's
  buffer. The directory is keyed by the featurizer (spec, fitted statistics), the window's files
  (path, size, modification time, Parquet footer) and the reader's settings, so a rerun over the
  same data reuses it and any change starts a new one. Read back, the chunks come in the order a
  streamed pass would featurize them, so disk-cached epochs are the streamed epochs, bit for bit.

The row accounting of the pass that filled the cache is replayed for every cached epoch: read =
trained + rejected + sampled out + held out holds per epoch exactly as when each epoch re-reads the
files.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from mtrank.features import storage
from mtrank.features.featurize import FeatureArrays, TableArrays

log = logging.getLogger("mtrank.cache")

MODES = ("auto", "memory", "disk", "off")


def nbytes(a: FeatureArrays) -> int:
    arrays = [a.ids, a.dense, *a.labels.values(), *a.masks.values(), *a.truth.values()]
    arrays += [] if a.group is None else [a.group]
    for t in a.bags.values():
        arrays += [t.values, t.offsets] + ([] if t.weights is None else [t.weights])
    return sum(x.nbytes for x in arrays)


def _flatten(a: FeatureArrays) -> dict[str, np.ndarray]:
    out = {"rows": np.array(a.rows), "ids": a.ids, "dense": a.dense}
    out |= {f"label/{k}": v for k, v in a.labels.items()} | {f"mask/{k}": v for k, v in a.masks.items()}
    out |= {f"truth/{k}": v for k, v in a.truth.items()}
    if a.group is not None:
        out["group"] = a.group
    for k, t in a.bags.items():
        out |= {f"bag/{k}/values": t.values, f"bag/{k}/offsets": t.offsets}
        if t.weights is not None:
            out[f"bag/{k}/weights"] = t.weights
    return out


def _unflatten(d: dict[str, np.ndarray]) -> FeatureArrays:
    def part(prefix: str) -> dict[str, np.ndarray]:
        return {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}

    bags = {name: TableArrays(d[f"bag/{name}/values"], d[f"bag/{name}/offsets"], d.get(f"bag/{name}/weights"))
            for name in {k.split("/")[1] for k in d if k.startswith("bag/")}}
    return FeatureArrays(int(d["rows"]), d["ids"], bags, d["dense"], part("label/"), part("mask/"),
                         d.get("group"), part("truth/"))


def files_signature(files) -> list:
    """What identifies a window's content without reading it all: path, size, mtime, footer."""
    sig = []
    for f in files:
        info = storage.file_info(str(f))
        footer = storage.parquet_file(str(f)).metadata
        sig.append([str(f), info.size, info.mtime_ns, footer.num_rows, footer.num_row_groups,
                    footer.serialized_size, footer.created_by])
    return sig


class FeatureCache:
    """Featurized rows of one reader's shard; give the same object to the reader of every epoch."""

    def __init__(self, mode: str = "auto", budget_bytes: int = 2 << 30, directory: str | Path | None = None):
        if mode not in MODES:
            raise ValueError(f"feature cache mode must be one of {MODES}, got {mode!r}")
        self.mode, self.budget, self.directory = mode, budget_bytes, directory
        self.arrays: FeatureArrays | None = None      # memory: the shard, in read order
        self.accounting = None                         # the filling pass's RowAccounting
        self.disk: Path | None = None                  # disk: a complete chunk directory
        self.kind = "none"                             # what it holds: none | memory | disk | stream
        self.filled_rows = 0

    # -- what the reader calls ---------------------------------------------------------------
    def batches(self, reader, epoch: int) -> Iterator:
        if self.mode == "off":
            yield from reader.streamed_batches(epoch)
            return
        if self.kind == "none":
            yield from self._first(reader, epoch)
        elif self.kind == "memory":
            reader.accounting = copy.deepcopy(self.accounting)
            yield from reader.permuted_batches(self.arrays, epoch)
        elif self.kind == "disk":
            reader.accounting = copy.deepcopy(self.accounting)
            yield from reader.buffered_batches(self._read_chunks(reader, epoch), epoch)
        else:
            yield from reader.streamed_batches(epoch)

    def _first(self, reader, epoch: int) -> Iterator:
        if self.mode in ("auto", "disk") and self.directory is not None:
            found = self._existing(reader)
            meta = json.loads((found / "accounting.json").read_text()) if found is not None else None
            # auto: the chunks of a window that fits in memory are not used (the memory cache's order wins)
            if meta is not None and (self.mode == "disk" or meta.get("bytes", 0) > self.budget):
                self.kind, self.disk = "disk", found
                self.accounting = _accounting(meta)
                log.info("feature cache: reusing %s", found)
                yield from self.batches(reader, epoch)
                return
        if self.mode in ("auto", "memory"):
            held, size = [], 0
            chunks = reader.featurized(None)       # the shard's own order: the same arrays whichever
            for part in chunks:                     # epoch fills them (a resumed run included)
                held.append(part)
                size += nbytes(part)
                if size > self.budget:
                    self._too_large()
                    self.kind = "spilling"   # read the rest once more, in this epoch's order
                    chunks.close()
                    yield from self._spill(reader, epoch)
                    return
            self._hold(held, size, reader)
            if self.arrays is None:
                return
            yield from reader.permuted_batches(self.arrays, epoch)
            return
        yield from self._spill(reader, epoch)

    def fill(self, reader, each: Callable[[FeatureArrays], None]) -> bool:
        """One featurized pass over the shard before training, each part handed to `each` (frequency
        admission counts ids on it). The parts are kept as the memory cache when the mode and budget
        allow, so the first epoch uses them instead of reading the window a second time. True when
        they were kept; otherwise the first epoch reads as it would have (the accounting is that
        epoch's own: every pass starts a new one)."""
        keep = self.kind == "none" and self.mode in ("auto", "memory")
        held, size = [], 0
        for part in reader.featurized(None):
            each(part)
            if keep:
                held.append(part)
                size += nbytes(part)
                if size > self.budget:
                    self._too_large()
                    keep, held = False, []
        if keep:
            self._hold(held, size, reader)
        return keep

    def _hold(self, held: list[FeatureArrays], size: int, reader) -> None:
        self.arrays = FeatureArrays.concat(held) if held else None
        self.accounting = copy.deepcopy(reader.accounting)
        self.kind, self.filled_rows = "memory", 0 if self.arrays is None else self.arrays.rows
        log.info("feature cache: %s rows featurized once, %.1f MiB in memory", f"{self.filled_rows:,}",
                 size / 2**20)

    def _too_large(self) -> None:
        log.info("feature cache: the window's featurized rows exceed %s MiB in memory%s", self.budget >> 20,
                 "; caching on disk" if self._can_disk() else "; every epoch featurizes again")

    def _can_disk(self) -> bool:
        return self.mode in ("auto", "disk") and self.directory is not None

    def _spill(self, reader, epoch: int) -> Iterator:
        """Stream this epoch through the buffer, writing its featurized chunks when a directory is set.
        A chunk's file is named by its place in the shard, not by when it was written, so the epochs
        that read them see the same order whichever epoch wrote them."""
        if not self._can_disk():
            self.kind = "stream"
            yield from reader.streamed_batches(epoch)
            return
        key = self._key(reader)
        root = Path(self.directory)
        tmp = root / f".{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

        size = [0]

        def writing():
            for (group, chunk), part in reader.keyed_featurized(epoch):
                np.savez(tmp / f"chunk-{group:07d}-{chunk:05d}.npz", **_flatten(part))
                size[0] += nbytes(part)
                yield part

        yield from reader.buffered_batches(writing(), epoch)
        (tmp / "accounting.json").write_text(json.dumps({**_accounting_dict(reader.accounting), "bytes": size[0]}))
        final = root / key
        for old in root.iterdir():           # one cache per directory: the newest window's
            if old != tmp and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        self.kind, self.disk, self.accounting = "disk", final, copy.deepcopy(reader.accounting)
        log.info("feature cache: featurized chunks written to %s", final)

    def _read_chunks(self, reader, epoch: int) -> Iterator[FeatureArrays]:
        """The chunks in the order a streamed pass of `epoch` would featurize them (its row-group order,
        chunks in order within a group): through the same buffer shuffle, the batches are those of
        reading the files, so whether the cache existed never changes training."""
        by_group: dict[int, list[Path]] = {}
        for f in sorted(self.disk.glob("chunk-*.npz")):
            by_group.setdefault(int(f.name.split("-")[1]), []).append(f)
        position = {id(g): k for k, g in enumerate(reader.groups)}
        for group in reader._order(epoch):
            for f in by_group.get(position[id(group)], []):
                with np.load(f) as z:
                    yield _unflatten({k: z[k] for k in z.files})

    def _existing(self, reader) -> Path | None:
        path = Path(self.directory) / self._key(reader)
        return path if (path / "accounting.json").exists() else None

    def _key(self, reader) -> str:
        blob = json.dumps({"featurizer": reader.featurizer.fingerprint(), "files": files_signature(
            reader.window.files), "groups": [[str(g.file), g.index] for g in reader.groups],
            "reader": reader.cache_settings()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _accounting_dict(acc) -> dict:
    return {"rows_read": acc.rows_read, "rows_accepted": acc.rows_accepted, "rejected": dict(acc.rejected),
            "row_groups": acc.row_groups, "quarantine_files": list(acc.quarantine_files),
            "unreadable": list(acc.unreadable), "sampled_out": acc.sampled_out,
            "held_out": acc.held_out}


def _accounting(d: dict):
    from collections import Counter

    from mtrank.pipeline.reader import RowAccounting

    return RowAccounting(d["rows_read"], d["rows_accepted"], Counter(d["rejected"]), d["row_groups"],
                         list(d["quarantine_files"]), list(d["unreadable"]), d["sampled_out"],
                         d.get("held_out", 0))
