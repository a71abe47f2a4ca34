"""Which folders of a log root are days, and which files a day holds.

Warehouses name day partitions their own way: Hive's `dt=2026-11-20`, MaxCompute's and Spark jobs'
`ds=20261120`, `date=…`, or a bare `2026-11-20`. Copying an object-store export only to rename its
folders costs a whole copy of the logs, so any `KEY=` (or no key) with an ISO or compact date is a day
folder. One root holds one key: a root with `dt=` and `ds=` folders would make "which days exist"
depend on a guess, so that is an error naming both. A day folder's files may sit in sub-partitions
(`ds=20261120/hour=00/part-0.parquet`, as `partitionBy("ds", "hour")` writes them); names starting
with `_` or `.` (`_SUCCESS`, `_temporary/`, `.crc`) are writers' bookkeeping and never read.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from pathlib import Path

from mtrank.features import storage
from mtrank.features.rules import UNREADABLE, BadInputError

DEFAULT_KEY = "dt"
_DAY = re.compile(r"^(?:([A-Za-z_]\w*)=)?(?:(\d{4})-(\d{2})-(\d{2})|(\d{4})(\d{2})(\d{2}))$")
LAYOUT = "DIR/dt=YYYY-MM-DD/ (or another key such as ds=, and YYYYMMDD dates)"


def parse(name: str) -> tuple[str, dt.date] | None:
    """(key, day) of a day folder's name, None for any other name; key "" for a bare date.
    Raises ValueError for a day-shaped name that is no date (`dt=2026-13-40`)."""
    m = _DAY.match(name)
    if not m:
        return None
    y, mo, d = (m.group(2), m.group(3), m.group(4)) if m.group(2) else (m.group(5), m.group(6), m.group(7))
    return m.group(1) or "", dt.date(int(y), int(mo), int(d))


def name_of(day: dt.date, like: Iterable[str] = ()) -> str:
    """The folder name `day` would have among the folders `like` (same key and date style), for
    messages about a missing day; dt=YYYY-MM-DD when there is none to copy."""
    for n in like:
        p = _DAY.match(n)
        if p:
            date = f"{day:%Y-%m-%d}" if p.group(2) else f"{day:%Y%m%d}"
            return f"{p.group(1)}={date}" if p.group(1) else date
    return f"{DEFAULT_KEY}={day:%Y-%m-%d}"


def day_map(root: str, named: Iterable[tuple[str, object]]) -> dict[dt.date, object]:
    """date -> entry for the day folders among (name, entry) pairs of one root's subfolders."""
    out: dict[dt.date, object] = {}
    keys: dict[str, str] = {}
    names: dict[dt.date, str] = {}
    for name, entry in named:
        try:
            hit = parse(name)
        except ValueError:
            raise BadInputError(str(entry), None, UNREADABLE, "partition name is not a valid date") from None
        if hit is None:
            continue
        key, day = hit
        keys.setdefault(key, name)
        if len(keys) > 1:
            a, b = list(keys.values())[:2]
            raise BadInputError(root, None, UNREADABLE,
                                f"day folders of two layouts ({a!r} and {b!r}): one root holds one key of day "
                                "folders; move the others to a root of their own")
        if day in out:
            raise BadInputError(root, None, UNREADABLE,
                                f"two folders for {day} ({names[day]!r} and {name!r}): keep one")
        out[day], names[day] = entry, name
    return dict(sorted(out.items()))


def _bookkeeping(parts: Iterable[str]) -> bool:
    return any(p.startswith(("_", ".")) for p in parts)


def files_under(folder: str | Path) -> list[str]:
    """The Parquet files of one day folder, sub-partitions included, in path order; writers'
    bookkeeping (`_SUCCESS`, `_temporary/`, hidden files) left out."""
    if storage.is_uri(folder):
        base = str(folder).rstrip("/")
        try:
            entries = storage.list_dir(base, recursive=True)
        except OSError as e:
            raise BadInputError(base, None, UNREADABLE, f"cannot list the partition ({storage.one_line(e)})") from None
        return [u for u, is_dir in entries if not is_dir and u.endswith(".parquet")
                and not _bookkeeping(u[len(base) + 1:].split("/"))]
    folder = Path(folder)
    return [str(f) for f in sorted(folder.rglob("*.parquet"))
            if f.is_file() and not _bookkeeping(f.relative_to(folder).parts)]


def find_day(root: str | Path, day: dt.date) -> str | None:
    """The folder of `day` directly under `root` in any day layout, None when there is none (or
    `root` cannot be listed: callers then read `root` itself)."""
    try:
        if storage.is_uri(root):
            base = str(root).rstrip("/")
            named = [(storage.name(u), u) for u, is_dir in storage.list_dir(base) if is_dir]
        else:
            named = [(p.name, str(p)) for p in sorted(Path(root).iterdir()) if p.is_dir()]
    except OSError:
        return None
    for name, entry in named:
        try:
            hit = parse(name)
        except ValueError:
            continue
        if hit is not None and hit[1] == day:
            return entry
    return None


def flat_hint(root: str | Path) -> str:
    """What to add when a root holds Parquet files but no day folder: the command that lays them out."""
    try:
        if storage.is_uri(root):
            flat = [u for u, is_dir in storage.list_dir(str(root).rstrip("/")) if not is_dir and u.endswith(".parquet")]
        else:
            flat = list(Path(root).glob("*.parquet")) if Path(root).is_dir() else []
    except OSError:
        return ""
    if not flat:
        return ""
    return (f"; found {len(flat)} .parquet file(s) directly under it: lay them out by day with `mtrank partition "
            f"--data {root} --time-column COLUMN --out DIR`")


def no_days_hint(names: Iterable[str]) -> str:
    """What to add when a root holds no day folder but a nested year=/month=/day= layout ("" otherwise)."""
    nested = [n for n in sorted(names) if re.match(r"^(year|yyyy|y)=\d{4}$", n, re.IGNORECASE)]
    if nested:
        return (f"; found {nested[0]!r}: nested year=/month=/day= folders are not read, mtrank reads one folder "
                "per day")
    return ""

