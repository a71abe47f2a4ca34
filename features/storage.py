"""Where input and output files live: a local path, or an object-store URI (`s3://bucket/prefix`).

The one place a location becomes (pyarrow filesystem, path): every reader and writer of logs,
candidates, exposures and ranked lists goes through here, so local paths and S3 behave alike and
the endpoint is chosen once. It sits in `features` (the lowest room, Arrow and polars only) because
spec inference (`init-spec`) reads logs too; `pipeline` and `jobs` use it from there.

Local paths are passed to pyarrow / polars exactly as before (no filesystem object), so nothing
changes for them. For S3 the endpoint comes from `AWS_ENDPOINT_URL_S3`, else `AWS_ENDPOINT_URL`
(as the AWS SDKs read them: `http://host:port` for MinIO, moto, Ceph, ...), the region from
`AWS_REGION` / `AWS_DEFAULT_REGION`, credentials from the SDK's usual chain (environment, profile,
instance metadata). Whether pyarrow's bundled AWS SDK reads the endpoint variables itself depends
on its version (pyarrow 25's does): we read them and pass `endpoint_override`, `scheme` and `region`
explicitly, and hand polars (which reads Parquet with its own object-store client) the same settings
as `storage_options`. Without either variable, the bucket's region is looked up once per bucket
(`FileSystem.from_uri`), as for plain AWS S3.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Iterable
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` other than `file://`: read through a pyarrow filesystem. Plain paths are local."""
    return isinstance(location, str) and bool(_URI.match(location)) and not location.startswith("file://")


def join(base: str | Path, *parts: str) -> str:
    """`base/part/...` for a URI or a local path."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def name(location: str | Path) -> str:
    """The last component (`part-0.parquet`, `dt=2026-11-01`)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_uri(location) else Path(location).name


def parent(location: str | Path) -> str:
    """The folder a file is in (for a URI: the prefix before its last `/`)."""
    if is_uri(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    """One client per endpoint and region (creating one resolves credentials: not per file)."""
    kw: dict = {}
    if endpoint:
        u = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kw.update(endpoint_override=u.netloc, scheme=u.scheme or "https", region=region or "us-east-1")
    elif region:
        kw.update(region=region)
    return pafs.S3FileSystem(**kw)


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it): `s3://bucket/key` -> (S3FileSystem, "bucket/key"); a local path ->
    (LocalFileSystem, path). Other schemes go to `pyarrow.fs.FileSystem.from_uri` (gs://, hdfs://)."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(location)
    scheme, _, rest = str(location).partition("://")
    if scheme.lower() in ("s3", "s3a") and "?" not in rest:
        endpoint, region = _endpoint(), _region()
        if endpoint or region:
            return _s3(endpoint, region), rest.rstrip("/")
        return _s3_bucket(rest.split("/", 1)[0]), rest.rstrip("/")
    fs, path = pafs.FileSystem.from_uri(str(location))
    return fs, path.rstrip("/")


@functools.lru_cache(maxsize=32)
def _s3_bucket(bucket: str) -> pafs.FileSystem:
    """pyarrow's own choice for plain AWS S3: the bucket's region, looked up once per bucket."""
    return pafs.FileSystem.from_uri(f"s3://{bucket}")[0]


def polars_options(sources: Iterable[str | Path]) -> dict | None:
    """`storage_options` for polars when any source is on S3 (same endpoint and region as pyarrow's)."""
    if not any(is_uri(s) for s in sources):
        return None
    opts = {}
    endpoint, region = _endpoint(), _region()
    if endpoint:
        opts["aws_endpoint_url"] = endpoint
        opts["aws_allow_http"] = str(endpoint.startswith("http://")).lower()
        opts["aws_region"] = region or "us-east-1"
    elif region:
        opts["aws_region"] = region
    return opts


def scan_parquet(sources: str | Path | list[str], **kw):
    """`polars.scan_parquet` for local files (unchanged) or object-store URIs."""
    import polars as pl

    opts = polars_options([sources] if isinstance(sources, (str, Path)) else sources)
    return pl.scan_parquet(sources, **kw) if opts is None else pl.scan_parquet(sources, storage_options=opts, **kw)


def scan_parquet_files(files: list[str], schemas: list[pa.Schema] | None = None):
    """One lazy frame over many files whose column types may differ between files (an id written as
    int32 one day and int64 the next, a price as float32 then float64). polars' multi-file scan
    takes the first file's types as the target and fails on any other, so files that disagree are
    scanned one by one and stacked with each column widened to the types' common supertype (a
    column missing from a file is null there). Files that agree are one scan, as before. Each
    file's types were already checked against the spec by `open_window`; hashing reads integers
    and strings as the same text, so widening changes no id. `schemas`: the files' schemas where the
    caller has read the footers already (`DataWindow.file_schemas`), else they are read here."""
    import polars as pl

    if schemas is None and len(files) > 1:
        try:
            schemas = [read_schema(f) for f in files]
        except (OSError, pa.ArrowException):   # an unreadable file: the scan fails on it, for the caller
            schemas = None
    schemas = schemas or []
    if all(s.equals(schemas[0]) for s in schemas[1:]):
        return scan_parquet(files, missing_columns="insert", extra_columns="ignore")
    return pl.concat([scan_parquet(f) for f in files], how="diagonal_relaxed")


# -- Parquet through the resolved filesystem ------------------------------------------------------
def parquet_file(location: str, **kw) -> pq.ParquetFile:
    if not is_uri(location):
        return pq.ParquetFile(location, **kw)
    fs, path = resolve(location)
    return pq.ParquetFile(path, filesystem=fs, **kw)


def read_metadata(location: str) -> pq.FileMetaData:
    if not is_uri(location):
        return pq.read_metadata(location)
    fs, path = resolve(location)
    return pq.read_metadata(path, filesystem=fs)


def read_schema(location: str) -> pa.Schema:
    if not is_uri(location):
        return pq.read_schema(location)
    fs, path = resolve(location)
    return pq.read_schema(path, filesystem=fs)


def read_table(location: str, **kw) -> pa.Table:
    if not is_uri(location):
        return pq.read_table(location, **kw)
    fs, path = resolve(location)
    return pq.read_table(path, filesystem=fs, **kw)


def file_info(location: str) -> pafs.FileInfo:
    """Size and modification time of one file, local or on S3."""
    fs, path = resolve(location)
    return fs.get_file_info(path)


# -- listing ----------------------------------------------------------------------------------------
def kind(location: str) -> str:
    """"file", "dir" or "missing" (an S3 prefix with objects under it is a "dir"; a missing bucket is
    "missing"). Raises OSError when the store cannot be asked (unreachable, access denied)."""
    fs, path = resolve(location)
    t = fs.get_file_info(path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(t, "missing")


def list_dir(location: str, recursive: bool = False) -> list[tuple[str, bool]]:
    """(URI, is_dir) of the entries under a remote folder, sorted by URI. OSError when it cannot be listed."""
    fs, path = resolve(location)
    scheme = str(location).split("://", 1)[0]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    return sorted((f"{scheme}://{i.path}", i.type == pafs.FileType.Directory) for i in infos
                  if i.type in (pafs.FileType.File, pafs.FileType.Directory))


# -- writing ----------------------------------------------------------------------------------------
def put(location: str, data: bytes) -> None:
    """Store a complete object under a remote name in one upload.

    An object store has no rename, and needs none: an object becomes visible only when its upload
    completes (one PUT, or the CompleteMultipartUpload of a large one), so readers see the old object
    or the whole new one, never a part. The data is assembled in memory first so that a failure
    while producing it can never complete an upload of half of it. Raises OSError naming nothing
    (the caller names the location)."""
    fs, path = resolve(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def check_bucket(location: str) -> None:
    """Fail before any work when the bucket of an output URI does not exist or cannot be reached
    (OSError), the object-store counterpart of an unwritable output folder."""
    fs, path = resolve(location)
    bucket = path.split("/", 1)[0]
    try:
        found = fs.get_file_info(bucket).type == pafs.FileType.Directory
    except OSError as e:
        if "ACCESS_DENIED" in str(e):   # a writer allowed PutObject but not ListBucket: the upload decides
            return
        raise
    if not found:
        raise FileNotFoundError(f"bucket {bucket!r} does not exist")


def one_line(e: BaseException) -> str:
    """An SDK error as one line (AWS messages can carry request ids and line breaks)."""
    return " ".join(str(e).split())
