"""Paths that may be local or on an object store (``s3://``, ``gs://``, ...), through fsspec.

Why fsspec: one API over local disks, S3 (``s3fs``), GCS (``gcsfs``) and the rest, with globbing
and the compression codecs our readers use; Beam's own sinks write to the same URLs through
Beam's FileSystems (``apache-beam[aws]`` for S3, ``[gcp]`` for GCS). Credentials and endpoints
come from each store's usual environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...).

Object stores have no rename and no folders: a write is a whole object appearing at once, a
"folder" is a prefix, and a move is a copy and a delete. The functions here keep the local
behaviour (atomic renames) on local paths and do the object-store equivalent elsewhere.
"""
from __future__ import annotations

import glob as _glob
import os
import shutil


def is_remote(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


# No listing cache: Beam's sinks write through their own clients, and a listing fsspec cached
# before (gcsfs answers "not found" for any name missing from a cached parent listing) would hide
# what they wrote. Every remote call asks the store.
NO_LISTING_CACHE = {"use_listings_cache": False}


def _fs(path: str):
    import fsspec.core

    try:
        return fsspec.core.url_to_fs(path, **NO_LISTING_CACHE)
    except ImportError as exc:  # s3fs / gcsfs not installed
        from curate.errors import CurateError

        raise CurateError(f"{path}: {exc}") from None


def _url(fs, path: str) -> str:
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return path if "://" in path else f"{protocol}://{path}"


def absolute(path: str) -> str:
    """A local path made absolute; a URL as it is."""
    return path if is_remote(path) else os.path.abspath(path)


def join(*parts: str) -> str:
    if not is_remote(parts[0]):
        return os.path.join(*parts)
    return "/".join([p.rstrip("/") for p in parts[:-1]] + [parts[-1]])


def glob(pattern: str) -> list[str]:
    """Files matching a glob, sorted (URLs stay URLs)."""
    if not is_remote(pattern):
        return sorted(p for p in _glob.glob(pattern, recursive=True) if os.path.isfile(p))
    fs, path = _fs(pattern)
    return sorted(_url(fs, p) for p in fs.glob(path) if fs.isfile(p))


def isfile(path: str) -> bool:
    if not is_remote(path):
        return os.path.isfile(path)
    fs, p = _fs(path)
    return fs.isfile(p)


def isdir(path: str) -> bool:
    if not is_remote(path):
        return os.path.isdir(path)
    fs, p = _fs(path)
    return fs.isdir(p)


def exists(path: str) -> bool:
    if not is_remote(path):
        return os.path.exists(path)
    fs, p = _fs(path)
    return fs.exists(p)


def listdir(path: str) -> list[str]:
    """Names in a folder ([] if there is none)."""
    if not is_remote(path):
        return os.listdir(path) if os.path.isdir(path) else []
    fs, p = _fs(path)
    if not fs.isdir(p):
        return []
    return sorted(os.path.basename(x.rstrip("/")) for x in fs.ls(p, detail=False))


def open_file(path: str, mode: str = "rb", **kwargs):
    if not is_remote(path):
        return open(path, mode, **kwargs)
    import fsspec

    return fsspec.open(path, mode, **NO_LISTING_CACHE, **kwargs).open()


def makedirs(path: str) -> None:
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)  # an object store has no folders to make


def remove(path: str) -> None:
    if not is_remote(path):
        os.remove(path)
    else:
        fs, p = _fs(path)
        fs.rm(p)


def rmtree(path: str) -> None:
    """Remove a folder and what it holds; nothing if it is not there."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs, p = _fs(path)
    if fs.exists(p):
        fs.rm(p, recursive=True)


def read_table(path: str, columns: list[str] | None = None):
    """A Parquet file as a pyarrow Table, local or on a store."""
    import pyarrow.parquet as pq

    if not is_remote(path):
        return pq.read_table(path, columns=columns)
    with open_file(path) as fh:
        return pq.read_table(fh, columns=columns)


def info(path: str) -> dict:
    """Size and, on a store, the object's ETag (its content fingerprint, without reading it)."""
    fs, p = _fs(path)
    meta = fs.info(p)
    return {"bytes": int(meta.get("size") or 0), "etag": str(meta.get("ETag") or meta.get("etag") or "").strip('"')}


def publish(tmp: str, out: str, marker: str = "manifest.json") -> None:
    """Make the finished folder ``tmp`` the output ``out``, replacing what was there.

    On a disk: two renames (the old output is moved aside first). On a store, where there is no
    rename: the old output's marker is deleted first (from then on readers refuse it), then the
    old objects; every object but the marker is copied under ``out``, and the marker last, so a
    reader never takes a half-copied folder for a finished one."""
    import uuid

    if not is_remote(out):
        if os.path.exists(out):
            old = f"{out}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        return
    fs, out_path = _fs(out)
    if fs.exists(f"{out_path}/{marker}"):
        fs.rm(f"{out_path}/{marker}")
    rmtree(out)
    _, tmp_path = _fs(tmp)
    files = fs.find(tmp_path)
    last = [f for f in files if f == f"{tmp_path}/{marker}"]
    for f in [f for f in files if f not in last] + last:
        fs.copy(f, out_path + f[len(tmp_path):])
    fs.rm(tmp_path, recursive=True)


class ParquetFile:
    """A Parquet output written a table at a time (each a row group), local or on a store: zstd,
    and list items named "item", as Beam's sinks write them and ``schemas/`` documents them
    (pyarrow's own default is "element"). A file given no table has the schema and no rows."""

    def __init__(self, path: str, schema):
        self.path, self.schema = path, schema

    def __enter__(self):
        import pyarrow.parquet as pq

        makedirs(os.path.dirname(self.path))
        self._fh = open_file(self.path, "wb")
        try:
            self._writer = pq.ParquetWriter(self._fh, self.schema, compression="zstd", use_compliant_nested_type=False)
        except BaseException:  # a schema the writer refuses: the file handle is not left open
            self._fh.close()
            raise
        return self

    def write(self, table) -> None:
        self._writer.write_table(table)

    def __exit__(self, *exc):
        try:
            self._writer.close()
        finally:
            self._fh.close()
        return False


def download_folder(url: str, local: str) -> None:
    """Copy every object under ``url`` into the local folder ``local``, whole or not at all
    (written beside it, then renamed into place; a folder already there is kept)."""
    import uuid

    if os.path.isdir(local):
        return
    fs, root = _fs(url)
    found = fs.find(root)
    if not found:
        raise FileNotFoundError(f"{url}: nothing there to copy")
    tmp = f"{local}.part-{uuid.uuid4().hex[:8]}"
    for f in found:
        dest = os.path.join(tmp, *f[len(root):].strip("/").split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        fs.get_file(f, dest)
    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    try:
        os.rename(tmp, local)
    except OSError:  # another process put it there first: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)


def upload_folder(local: str, url: str, last: str) -> None:
    """Copy the local folder ``local`` under ``url``, the file named ``last`` (relative to
    ``local``) after every other, so a reader that waits for ``last`` never sees half a folder."""
    fs, root = _fs(url)
    files = sorted(os.path.relpath(os.path.join(d, n), local) for d, _, names in os.walk(local) for n in names)
    for rel in [f for f in files if f != last] + [f for f in files if f == last]:
        fs.put_file(os.path.join(local, rel), f"{root}/{rel.replace(os.sep, '/')}")
