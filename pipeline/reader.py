"""Streaming Parquet -> validated rows -> training tensors, with memory bounded by the buffer.

One pass reads this rank's row groups (optionally in a seeded random order), validates every chunk
with the spec's rules, sets bad rows aside (fail or quarantine), and turns accepted rows into
Batches through a bounded shuffle buffer. Every pass keeps a RowAccounting that always balances:
rows read = rows accepted (yielded) + rows rejected.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import numpy as np
import xxhash
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mtrank.features import storage
from mtrank.features.featurize import FeatureArrays, Featurizer
from mtrank.features.hashing import hash_expr
from mtrank.features.numeric import NumericStats
from mtrank.features.rules import (MISSING_COLUMN, NULL, REASON, UNREADABLE, WRONG_TYPE, BadInputError, RowRule,
                            float_columns, reject_reason_expr, row_rules)
from mtrank.features.spec import CategoricalFeature, FeatureSpec, MultiHotFeature, SpecError
from mtrank.pipeline.dataset import SKIP_HINT, DataWindow, RowGroup
from mtrank.pipeline.progress import Progress

if TYPE_CHECKING:   # tensors only where batches are made: reading and validating need no torch
    from mtrank.models.batch import Batch
    from mtrank.pipeline.feature_cache import FeatureCache

log = logging.getLogger("mtrank.reader")


@dataclass
class RowAccounting:
    rows_read: int = 0
    rows_accepted: int = 0
    rejected: Counter = field(default_factory=Counter)  # "column:rule" -> rows
    row_groups: int = 0
    quarantine_files: list[str] = field(default_factory=list)
    unreadable: list[dict] = field(default_factory=list)  # skipped (on_unreadable="skip"): file, row group, rows
    sampled_out: int = 0   # negatives left out by negative down-sampling (read, deliberately not trained)
    held_out: int = 0      # rows of the other side of a hashed validation split (train.validation_fraction)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def balanced(self) -> bool:
        return self.rows_read == self.rows_accepted + self.rows_rejected + self.sampled_out + self.held_out

    def add(self, other: "RowAccounting") -> None:
        """In place: `other`'s rows counted into this pass."""
        self.__dict__.update(self.merge(other).__dict__)

    def merge(self, other: "RowAccounting") -> "RowAccounting":
        return RowAccounting(self.rows_read + other.rows_read, self.rows_accepted + other.rows_accepted,
                             self.rejected + other.rejected, self.row_groups + other.row_groups,
                             self.quarantine_files + other.quarantine_files, self.unreadable + other.unreadable,
                             self.sampled_out + other.sampled_out, self.held_out + other.held_out)

    @staticmethod
    def total(parts: Iterable[RowAccounting]) -> RowAccounting:
        """Several readers' accounts as one (epochs of a pass, ranks of a job)."""
        out = RowAccounting()
        for p in parts:
            out = out.merge(p)
        return out

    def as_dict(self) -> dict:
        return {"rows_read": self.rows_read, "rows_accepted": self.rows_accepted,
                "rows_rejected": self.rows_rejected, "rejected_by_reason": dict(sorted(self.rejected.items())),
                "row_groups": self.row_groups, "quarantine_files": len(self.quarantine_files),
                "sampled_out": self.sampled_out, "held_out": self.held_out,
                "balanced": self.balanced, "unreadable_skipped": len(self.unreadable),
                "rows_skipped": sum(u["rows"] for u in self.unreadable), "unreadable": list(self.unreadable)}


HOLDOUT_SEED = 0x5EED_F00D
_HOLDOUT_BUCKETS = 1 << 31


def validation_requests(requests: pa.Array | pa.ChunkedArray, fraction: float) -> np.ndarray:
    """Rows whose request id is on the validation side of a `fraction` split: a stable hash of the id
    (the hashing of features, its own seed), so every row of a request lands on the same side, on
    every rerun, rank and epoch. A null request id is always training."""
    ids = pl.select(hash_expr(pl.lit(pl.from_arrow(requests)), pl.from_arrow(requests).dtype, HOLDOUT_SEED,
                              _HOLDOUT_BUCKETS)).to_series().to_numpy()
    return (ids > 0) & (ids <= fraction * (_HOLDOUT_BUCKETS - 1))


def keep_mask(group: RowGroup, offset: int, n: int, rate: float, salt: str = "") -> np.ndarray:
    """Rows [offset, offset + n) of a row group kept at `rate`: a SplitMix64 hash of (the file's last
    two path components, row group, row position), so the choice does not depend on shuffling,
    ranks, epochs or where the data root is mounted. `salt` makes another draw (independent of the
    negative sampling's) for another purpose."""
    where = "/".join(str(group.file).replace("\\", "/").rsplit("/", 2)[-2:])
    x = np.uint64(xxhash.xxh64_intdigest(f"{salt}{where}#{group.index}".encode())) + np.arange(offset, offset + n,
                                                                                           dtype=np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53 < rate


def skipped_files(*sources) -> list[dict]:
    """The unreadable files / row groups skipped by windows (footer) and readers (pages), each once
    (a pass per epoch meets the same ones again)."""
    out: dict[tuple, dict] = {}
    for src in sources:
        for u in getattr(src, "unreadable", None) or []:
            out.setdefault((u["file"], u["row_group"]), u)
    return list(out.values())


def rule_columns(spec: FeatureSpec) -> list[str]:
    """Columns the row rules look at (small, numeric: cheap to validate on their own)."""
    return list(dict.fromkeys([*spec.group_columns, *(f.name for f in spec.numeric), *(t.label for t in spec.tasks)]))


def read_columns(spec: FeatureSpec, schema: pa.Schema, with_eval: bool) -> list[str]:
    cols = list(spec.required_columns)
    if with_eval:
        cols += [c for c in spec.ground_truth.values() if c in schema.names]
    return cols


def stack_batches(batches: Sequence[pa.RecordBatch], source: str) -> pa.Table:
    """The batches a reader yielded, as one table. Files of one day may differ in width (an id
    written as int32 in one file and int64 in the next, a string as large_string): such columns are
    widened to one type; kinds that cannot be (ids as strings in one file and integers in another)
    are a clear error naming the column, not a traceback."""
    try:
        return pa.concat_tables([pa.Table.from_batches([b]) for b in batches], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid) as e:
        raise BadInputError(source, None, WRONG_TYPE, f"the files disagree on a column's type ({e})") from None


def open_parquet(path: str, spec: FeatureSpec) -> pq.ParquetFile:
    """Open for reading with the string id columns decoded as Arrow dictionaries (hash once per value).

    The footer is read once: the second handle reuses the first one's metadata. Page checksums (CRC32,
    written by `mtrank generate` and most writers when asked) are verified, so a corrupt page that
    would still decode is an error instead of silently wrong values. `path` may be an object-store URI.
    """
    meta = storage.read_metadata(path)
    ids = {f.name for f in spec.features if isinstance(f, (CategoricalFeature, MultiHotFeature))}
    paths = [c.path for c in (meta.schema.column(i) for i in range(len(meta.schema)))
             if c.path.split(".", 1)[0] in ids and c.physical_type == "BYTE_ARRAY"]
    return storage.parquet_file(path, metadata=meta, read_dictionary=paths,
                                page_checksum_verification=True)  # pages written with a CRC are checked


DUPLICATE_ROW = "row:duplicate_row"
DUPLICATE_SEED = 0x6475706C  # fixed: the same rows are duplicates on every rank and run


def duplicate_rows(window: DataWindow, spec: FeatureSpec) -> dict[str, np.ndarray]:
    """file -> sorted row numbers (within the file) of rows identical, on every column the spec reads,
    to an earlier row of the window (files in window order, rows in file order). One columnar pass;
    every rank computes the same answer, so a copy is dropped whichever shard it lands in."""
    cols = list(spec.required_columns)
    frames = []
    for i, f in enumerate(window.files):
        frames.append(storage.scan_parquet(f).select(cols).select(
            pl.struct(pl.all()).hash(DUPLICATE_SEED).alias("h"), pl.lit(i, pl.Int32).alias("f"),
            pl.int_range(pl.len(), dtype=pl.Int64).alias("r")))
    if not frames:
        return {}
    try:
        dup = pl.concat(frames).filter(~pl.col("h").is_first_distinct()).select("f", "r").collect()
    except (pl.exceptions.PolarsError, OSError) as e:
        raise BadInputError(window.root, None, UNREADABLE, f"cannot scan the window for duplicate rows ({e}); "
                            "use duplicate_rows: keep to read what is readable") from None
    out = {}
    for (fid,), part in dup.group_by(["f"]):
        out[window.files[fid]] = np.sort(part["r"].to_numpy())
    return out


class RowValidator:
    """Applies the spec's row rules to chunks of one file; fails or quarantines the bad rows."""

    def __init__(self, spec: FeatureSpec, quarantine_dir: str | Path | None, not_null: Sequence[str] = ()):
        """`not_null`: more columns a stage needs on every row (e.g. the request id for tune-fusion)."""
        self.spec, self.not_null = spec, tuple(not_null)
        self.quarantine_dir = Path(quarantine_dir) if quarantine_dir else None
        if spec.on_bad_row == "quarantine" and self.quarantine_dir is None:
            raise SpecError("the FeatureSpec says on_bad_row: quarantine, but no quarantine directory was given "
                            "(set quarantine_dir in the job config, or --quarantine-dir)")
        self._rules: dict[frozenset, pl.Expr] = {}
        self._cols = list(dict.fromkeys([*rule_columns(spec), *self.not_null]))

    def _reason(self, schema: pa.Schema) -> pl.Expr:
        floats = float_columns(schema)
        if floats not in self._rules:
            self._rules[floats] = reject_reason_expr(
                [RowRule(c, NULL, pl.col(c).is_null()) for c in self.not_null] + row_rules(self.spec, floats))
        return self._rules[floats]

    def split(self, rb: pa.RecordBatch, schema: pa.Schema, group: RowGroup, chunk: int,
              acc: RowAccounting, duplicates: np.ndarray | None = None) -> pa.RecordBatch:
        """The accepted rows of a chunk; bad rows are counted and raised or quarantined.
        `duplicates`: rows that copy an earlier row (spec duplicate_rows: reject): counted, dropped."""
        if duplicates is not None and duplicates.any():
            n = int(duplicates.sum())
            acc.rows_read += n
            acc.rejected[DUPLICATE_ROW] += n
            rb = rb.filter(pa.array(~duplicates))
        acc.rows_read += rb.num_rows
        reason = pl.from_arrow(rb.select(self._cols)).select(self._reason(schema)).to_series()
        bad = reason.is_not_null()
        if not bad.any():
            acc.rows_accepted += rb.num_rows
            return rb
        if self.spec.on_bad_row == "fail":
            self._fail(group.file, schema)
        mask = bad.to_arrow()
        rejected = pl.from_arrow(pa.Table.from_batches([rb.filter(mask)])).with_columns(
            reason.filter(bad), pl.lit(group.file).alias("_source_file"))
        for r, c in rejected.get_column(REASON).value_counts().iter_rows():
            acc.rejected[r] += c
        acc.quarantine_files.append(self._quarantine(rejected, group, chunk))
        good = rb.filter(pc.invert(mask))
        acc.rows_accepted += good.num_rows
        return good

    def _fail(self, file: str, schema: pa.Schema) -> None:
        """Count every bad row of the whole file, then raise naming the most common problem."""
        reasons = (pl.from_arrow(storage.read_table(file, columns=self._cols)).select(self._reason(schema))
                   .to_series().drop_nulls().value_counts(sort=True))
        (top, n), others = reasons.row(0), reasons.height - 1
        column, rule = top.rsplit(":", 1)
        more = f"; {others} other problem(s) in this file" if others else ""
        raise BadInputError(file, column, rule, f"rows of this file break this rule{more} "
                            "(set on_bad_row: quarantine to set bad rows aside)", count=int(n))

    def _quarantine(self, rows: pl.DataFrame, group: RowGroup, chunk: int) -> str:
        out_dir = self.quarantine_dir / f"dt={group.date}"
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{Path(group.file).stem}.rg{group.index}.c{chunk}.parquet"
        tmp = path.with_suffix(".tmp")
        rows.write_parquet(tmp)
        os.replace(tmp, path)  # a rerun overwrites the same name: idempotent, never half-written
        return str(path)


class ImpressionReader:
    """Streams one rank's share of a data window as Batches (or as accepted raw frames).

    Shuffling permutes the row groups of each epoch and the rows of a `shuffle_buffer` window. The
    buffer's random gather is cache-bound: 64k rows keeps ~0.7M rows/s on 2 cores, 256k rows mixes
    more but halves the rate (see bench/results/reader.md).
    """

    def __init__(self, window: DataWindow, spec: FeatureSpec, featurizer: Featurizer | None = None, *,
                 batch_size: int = 4096,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, shuffle_buffer: int = 65_536,
                 seed: int = 0, chunk_rows: int = 65_536, quarantine_dir: str | Path | None = None,
                 with_eval: bool = False, progress: bool | None = None, extra_columns: Sequence[str] = (),
                 not_null: Sequence[str] = (), negatives: tuple[str, float] | None = None,
                 cache: "FeatureCache | None" = None, workers: int = 1,
                 holdout: tuple[str, float, bool] | None = None):
        """`extra_columns`: more columns for `frames()` to keep (e.g. request_id, price); each must
        exist in every file (BadInputError naming the file and column otherwise). `not_null`: those of
        them a row must have (a null one makes the row bad: failed or quarantined, counted).
        `negatives`: (label column, keep rate): rows whose label is 0 are kept at that rate
        (`keep_mask`), the others counted as sampled out. `cache`: featurize once and reuse the arrays
        (`pipeline.feature_cache`; the same object for every epoch's `batches`). `workers`: threads
        reading, validating and featurizing row groups ahead of the consumer (same rows, same order).
        `holdout`: (request id column or None, fraction, side): a stable hash of the request id (of the
        row's position without one) puts that share of the requests on the validation side; the reader
        keeps one side (True: validation) and counts the other as held out."""
        if batch_size <= 0:
            raise ValueError("batch_size must be positive")
        if featurizer is not None and featurizer.spec is not spec:
            raise ValueError("featurizer was built for another FeatureSpec")
        self.window, self.featurizer, self.spec = window, featurizer, spec
        self.groups = window.shard(rank, world_size)
        self.batch_size, self.shuffle, self.seed, self.chunk_rows = batch_size, shuffle, seed, chunk_rows
        self.buffer_rows = max(batch_size, shuffle_buffer if shuffle else 65_536)
        self.validator = RowValidator(self.spec, quarantine_dir, not_null)
        self.progress, self.with_eval = progress, with_eval
        self.extra_columns = tuple(extra_columns)
        self.accounting = RowAccounting()
        self._dups: dict[str, np.ndarray] | None = None   # spec duplicate_rows: reject, computed once
        self.negatives = negatives if negatives is not None and negatives[1] < 1 else None
        self.cache = cache
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self.workers = workers
        self.holdout = holdout

    @property
    def rows(self) -> int:
        """Rows this rank will read per pass (before validation)."""
        return sum(g.rows for g in self.groups)

    def _duplicates_ready(self) -> None:
        """Compute the duplicate masks before worker threads ask for them."""
        if self.spec.duplicate_rows == "reject" and self._dups is None:
            self._dups = duplicate_rows(self.window, self.spec)
            self._rg_start = {}
            for f in self._dups:
                meta = storage.parquet_file(f).metadata
                self._rg_start[f] = np.concatenate(
                    [[0], np.cumsum([meta.row_group(i).num_rows for i in range(meta.num_row_groups)])])

    def _duplicates(self, group: RowGroup, offset: int, n: int) -> np.ndarray | None:
        """Mask of the rows [offset, offset + n) of a row group that copy an earlier row (or None)."""
        if self.spec.duplicate_rows != "reject":
            return None
        self._duplicates_ready()
        rows = self._dups.get(group.file)
        if rows is None:
            return None
        start = int(self._rg_start[group.file][group.index]) + offset
        lo, hi = np.searchsorted(rows, [start, start + n])
        mask = np.zeros(n, bool)
        mask[rows[lo:hi] - start] = True
        return mask

    def _order(self, epoch: int | None) -> list[RowGroup]:
        if not self.shuffle or epoch is None:
            return list(self.groups)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0]))
        return [self.groups[i] for i in rng.permutation(len(self.groups))]

    def frames(self, epoch: int | None = 0) -> Iterator[pa.RecordBatch]:
        """Accepted raw rows, one chunk at a time; resets `accounting` for this pass. Epoch None: the
        shard's own row-group order, whatever the shuffling."""
        for _, rb in self.keyed_frames(epoch):
            yield rb

    def keyed_frames(self, epoch: int | None = 0) -> Iterator[tuple[tuple[int, int], pa.RecordBatch]]:
        """`frames` with where each chunk comes from: (position of its row group in the shard, chunk)."""
        yield from self._keyed(epoch, featurize=False)

    def _keyed(self, epoch: int | None, featurize: bool) -> Iterator[tuple[tuple[int, int], object]]:
        """One pass in `epoch`'s row-group order. With `workers` > 1 the row groups are read, validated
        (and featurized) by a thread pool a few groups ahead, and consumed in order: the chunks, their
        keys and the accounting are those of the one-thread pass, only sooner (Arrow and polars
        release the GIL, and training overlaps with the next groups' reading)."""
        acc = self.accounting = RowAccounting()
        bar = Progress("read", total=self.rows, enabled=self.progress) if self.progress is not False else None
        position = {id(g): k for k, g in enumerate(self.groups)}
        order = self._order(epoch)
        pool = None
        try:
            if self.workers <= 1 or len(order) <= 1:
                opened: dict = {}
                for group in order:
                    for read, key, item in self._group(group, position[id(group)], acc, opened, featurize):
                        if bar is not None:
                            bar.update(read)
                        if item is not None:
                            yield key, item
                return
            self._duplicates_ready()
            local = threading.local()

            def job(group: RowGroup):
                part = RowAccounting()
                opened = local.__dict__.setdefault("opened", {})
                return list(self._group(group, position[id(group)], part, opened, featurize)), part

            pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mtrank-read")
            ahead = iter(order)
            pending = deque(pool.submit(job, g) for g in itertools.islice(ahead, 2 * self.workers))
            while pending:
                items, part = pending.popleft().result()
                nxt = next(ahead, None)
                if nxt is not None:
                    pending.append(pool.submit(job, nxt))
                acc.add(part)
                for read, key, item in items:
                    if bar is not None:
                        bar.update(read)
                    if item is not None:
                        yield key, item
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()

    def _group(self, group: RowGroup, pos: int, acc: RowAccounting, opened: dict, featurize: bool):
        """(rows consumed, key, accepted chunk or None) for each chunk of one row group; counts into `acc`.
        `opened`: file -> (ParquetFile, schema, columns) or None (unreadable), reused across groups."""
        if group.file not in opened:
            try:
                pf = open_parquet(group.file, self.spec)
            except (OSError, pa.ArrowException) as e:
                self._unreadable(acc, group, group.rows, f"cannot open ({e})")
                return
            schema = pf.schema_arrow
            for col in self.extra_columns:
                if col not in schema.names:
                    raise BadInputError(group.file, col, MISSING_COLUMN, "column is required by this job")
            cols = list(dict.fromkeys([*read_columns(self.spec, schema, self.with_eval), *self.extra_columns]))
            if self.holdout is not None and self.holdout[0] is not None:
                if self.holdout[0] not in schema.names:
                    raise BadInputError(group.file, self.holdout[0], MISSING_COLUMN,
                                        "the request id column is required by train.validation_fraction")
                cols = list(dict.fromkeys([*cols, self.holdout[0]]))
            opened.clear()          # one open file at a time (row groups of a file come together)
            opened[group.file] = (pf, schema, cols)
        pf, schema, cols = opened[group.file]
        acc.row_groups += 1
        done, i = 0, 0
        chunks = pf.iter_batches(batch_size=self.chunk_rows, row_groups=[group.index], columns=cols)
        while True:
            try:  # only the read itself: a failure to quarantine is not an unreadable file
                rb = next(chunks, None)
            except (OSError, pa.ArrowException) as e:
                self._unreadable(acc, group, group.rows - done, f"row group {group.index} cannot be read "
                                 f"({e})" + (f" after {done:,} of its {group.rows:,} rows" if done else ""))
                break
            if rb is None:
                break
            n = rb.num_rows
            dups = self._duplicates(group, done, n)
            if self.holdout is not None:      # the other side of the validation split: read, counted, not used
                column, fraction, validation_side = self.holdout
                held = (validation_requests(rb.column(column), fraction) if column is not None
                        else keep_mask(group, done, n, fraction, salt="holdout:"))   # no requests: rows
                drop = held != validation_side
                if drop.any():
                    acc.rows_read += int(drop.sum())
                    acc.held_out += int(drop.sum())
                    rb = rb.filter(pa.array(~drop))
                    dups = None if dups is None else dups[~drop]
            if self.negatives is not None:   # before the rules: a sampled-out row is read, never trained
                label, rate = self.negatives
                drop = ~keep_mask(group, done, n, rate) & (pc.fill_null(
                    pc.equal(rb.column(label).cast(pa.int64()), 0), False).to_numpy(zero_copy_only=False))
                if drop.any():
                    acc.rows_read += int(drop.sum())
                    acc.sampled_out += int(drop.sum())
                    rb = rb.filter(pa.array(~drop))
                    dups = None if dups is None else dups[~drop]
            good = self.validator.split(rb, schema, group, i, acc, dups)
            item = None
            if good.num_rows:
                item = self.featurizer.transform(good, with_eval=self.with_eval) if featurize else good
            yield n, (pos, i), item
            done, i = done + n, i + 1

    def _unreadable(self, acc: RowAccounting, group: RowGroup, rows: int, detail: str) -> None:
        """A corrupt file: fail naming it, or (window opened with on_unreadable="skip") skip the rest of
        this row group, counted in the accounting and logged, never silently."""
        if self.window.on_unreadable != "skip":
            raise BadInputError(group.file, None, UNREADABLE, f"{detail}; {SKIP_HINT}")
        log.warning("skipping %s: rule %s: %s; %s rows not read", group.file, UNREADABLE, detail, f"{rows:,}")
        acc.unreadable.append({"file": group.file, "row_group": group.index, "rows": rows, "error": detail})

    def batches(self, epoch: int = 0) -> Iterator[Batch]:
        """Batches of `batch_size` rows (the last may be smaller); every accepted row exactly once."""
        if self.featurizer is None:
            raise ValueError("batches() needs a Featurizer (spec + fitted numeric statistics)")
        if self.cache is not None:
            yield from self.cache.batches(self, epoch)
        else:
            yield from self.streamed_batches(epoch)

    def streamed_batches(self, epoch: int) -> Iterator[Batch]:
        """Read, featurize and shuffle through the buffer: what every epoch does without a cache."""
        yield from self.buffered_batches(self.featurized(epoch), epoch)

    def featurized(self, epoch: int | None) -> Iterator[FeatureArrays]:
        """The accepted rows of one pass, featurized a chunk at a time (read order of `epoch`)."""
        for _, part in self.keyed_featurized(epoch):
            yield part

    def keyed_featurized(self, epoch: int | None) -> Iterator[tuple[tuple[int, int], FeatureArrays]]:
        yield from self._keyed(epoch, featurize=True)

    def buffered_batches(self, chunks: Iterable[FeatureArrays], epoch: int) -> Iterator[Batch]:
        """Batches from featurized chunks, shuffled a `shuffle_buffer` of rows at a time."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 1]))
        pending: list[FeatureArrays] = []
        pending_rows = 0
        for part in chunks:
            pending.append(part)
            pending_rows += part.rows
            if pending_rows >= self.buffer_rows:
                rest = yield from self._emit(FeatureArrays.concat(pending), rng, final=False)
                pending, pending_rows = ([rest], rest.rows) if rest.rows else ([], 0)
        if pending_rows:
            yield from self._emit(FeatureArrays.concat(pending), rng, final=True)

    def permuted_batches(self, arrays: FeatureArrays, epoch: int) -> Iterator[Batch]:
        """Batches from a whole featurized shard: one seeded permutation of all its rows per epoch
        (in read order without shuffling)."""
        from mtrank.pipeline.batch import batch_from_arrays

        n = arrays.rows
        order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 2])).permutation(n) \
            if self.shuffle else None
        block = self.batch_size * max(1, self.buffer_rows // self.batch_size)
        for lo in range(0, n, block):   # one gather per buffer of rows, then contiguous batch slices
            hi = min(lo + block, n)
            part = arrays.slice(lo, hi) if order is None else arrays.take(order[lo:hi])
            for start in range(0, hi - lo, self.batch_size):
                yield batch_from_arrays(part.slice(start, min(start + self.batch_size, hi - lo)))

    def cache_settings(self) -> dict:
        """What besides the featurizer and files decides the rows a cache holds."""
        return {"with_eval": self.with_eval, "negatives": self.negatives, "holdout": self.holdout,
                "extra": self.extra_columns, "chunk_rows": self.chunk_rows, "on_unreadable": self.window.on_unreadable}

    def _emit(self, arrays: FeatureArrays, rng: np.random.Generator, final: bool):
        """Yield full batches from a buffer (shuffled first); return the rows left over."""
        from mtrank.pipeline.batch import batch_from_arrays

        if self.shuffle:
            arrays = arrays.take(rng.permutation(arrays.rows))
        n = arrays.rows if final else arrays.rows - arrays.rows % self.batch_size
        for start in range(0, n, self.batch_size):
            yield batch_from_arrays(arrays.slice(start, min(start + self.batch_size, n)))
        return arrays.slice(n, arrays.rows)


def fit_numeric_stats(reader: ImpressionReader) -> NumericStats:
    """One pass over accepted rows: standardisation moments of the training window, the quantile
    sketches of piecewise-linear features (their bin edges), and the moments of each task's target
    (used to start its head at the base rate / target mean)."""
    stats = NumericStats()
    spec = reader.spec
    cols = [f.name for f in spec.dense if f.standardize or f.piecewise_linear]
    for t in spec.tasks:
        cols += [t.label] + ([spec.space_label(t)] if spec.space_label(t) else [])
    cols = list(dict.fromkeys(cols))
    for rb in reader.frames():
        stats = stats.merge(NumericStats.of_frame(pl.from_arrow(rb.select(cols)), reader.spec))
    return stats
