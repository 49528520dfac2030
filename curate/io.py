"""Reading input files into raw rows, sampling them, fingerprinting them.

A file yields ``RawRow`` items in file order. A line that is not JSON or not
UTF-8 is still yielded, as a bad row with its reason, so it reaches rejects/
instead of stopping the job. A file that cannot be read at all raises
``SourceReadError`` with a one-line message naming the file.
"""
from __future__ import annotations

import glob
import hashlib
import heapq
import itertools
import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from curate import storage
from curate.errors import CurateError

FORMATS = ("auto", "json", "jsonl", "parquet", "arrow")
_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".pq": "parquet",
             ".arrow": "arrow"}
# Compressed JSON and JSON lines are read through fsspec's codecs (gzip, bz2 and xz from the standard
# library, zstd from the zstandard package): ``rows.jsonl.zst`` is JSON lines.
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".bz2": "bz2", ".xz": "xz"}


def _suffix(path: str) -> tuple[str, str | None]:
    """(format suffix, compression) of a file name: ``a.jsonl.gz`` -> (".jsonl", "gzip")."""
    stem, ext = os.path.splitext(path)
    compression = COMPRESSIONS.get(ext.lower())
    if compression:
        ext = os.path.splitext(stem)[1]
    return ext.lower(), compression


def _open(path: str):
    """A binary file object (local or a URL), decompressed when the name says so (buffered:
    zstandard's reader cannot iterate lines by itself)."""
    import io

    import fsspec

    from curate.storage import NO_LISTING_CACHE

    compression = _suffix(path)[1]
    handle = fsspec.open(path, "rb", compression=compression, **NO_LISTING_CACHE).open()
    return io.BufferedReader(handle) if compression == "zstd" else handle


class SourceReadError(CurateError):
    """A whole input file cannot be read; the message names the file."""


@dataclass
class RawRow:
    """One row as read: a parsed object, or the raw text and why it is bad."""

    file: str
    row_number: int  # 1-based: line number for jsonl, position for json/parquet
    value: Any = None
    bad_reason: str | None = None
    bad_detail: str = ""
    raw_text: str | None = None

    def sample_key(self) -> bytes:
        """Content bytes used by seeded sampling (independent of file order)."""
        if self.raw_text is not None:
            return self.raw_text.encode("utf-8", "backslashreplace")
        return json.dumps(self.value, sort_keys=True, ensure_ascii=False, default=str).encode(
            "utf-8", "backslashreplace")


def resolve_paths(pattern: str) -> list[str]:
    """Files matching a path or glob (local, or a URL such as ``s3://bucket/data/*.jsonl.gz``),
    sorted; empty list if none. A folder written by Hugging Face ``datasets``' ``save_to_disk``
    is its Arrow files, in the dataset's order."""
    if glob.has_magic(pattern):
        return storage.glob(pattern)
    if storage.isdir(pattern):
        return saved_dataset_files(pattern)
    return [pattern] if storage.isfile(pattern) else []


def saved_dataset_files(folder: str) -> list[str]:
    """The Arrow files of a ``Dataset.save_to_disk`` folder (``state.json`` lists them); a
    ``DatasetDict`` folder is refused with its split names, since which split is the pool is the
    user's call; any other folder has no files."""
    state, splits = storage.join(folder, "state.json"), storage.join(folder, "dataset_dict.json")
    if storage.isfile(splits):
        with storage.open_file(splits) as fh:
            names = json.load(fh).get("splits", [])
        example = storage.join(folder, names[0] if names else "train")
        raise SourceReadError(f"{folder}: a saved DatasetDict with splits {', '.join(names)}; "
                              f"point the path at one split, e.g. {example}")
    if not storage.isfile(state):
        return []
    with storage.open_file(state) as fh:
        files = [f["filename"] for f in json.load(fh).get("_data_files", [])]
    if not files:
        raise SourceReadError(f"{folder}: state.json lists no data files")
    return [storage.join(folder, f) for f in files]


def detect_format(path: str, declared: str = "auto") -> str:
    """json, jsonl or parquet. A ``.json`` file whose first character is ``{`` is JSON lines."""
    if declared != "auto":
        return declared
    ext, compression = _suffix(path)
    fmt = _SUFFIXES.get(ext)
    if fmt is None or (compression and fmt not in ("json", "jsonl")):
        raise SourceReadError(f"{path}: cannot tell the format from the suffix {ext!r}; "
                              f"set 'format' to one of json, jsonl, parquet, arrow (json and jsonl may be "
                              f"compressed: {', '.join(COMPRESSIONS)})")
    if fmt == "json":
        try:
            with _open(path) as fh:
                head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
        except Exception as err:  # noqa: BLE001 - a broken compressed stream; preflight names it
            raise SourceReadError(f"{path}: cannot read ({_one_line(err)})") from None
        if head.startswith(b"{"):
            return "jsonl"
    return fmt


def preflight(path: str, fmt: str) -> None:
    """Cheap checks in the driver so an unreadable file fails before the job starts."""
    if not storage.isfile(path):
        raise SourceReadError(f"{path}: no such file")
    if not storage.is_remote(path) and not os.access(path, os.R_OK):
        raise SourceReadError(f"{path}: permission denied")
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            with storage.open_file(path) as fh:
                pq.read_metadata(fh)
        except Exception as err:  # noqa: BLE001 - any failure means "not readable"
            raise SourceReadError(f"{path}: not a readable Parquet file ({_one_line(err)})") from None
    elif fmt == "arrow":
        try:
            _arrow_reader(path)
        except Exception as err:  # noqa: BLE001
            raise SourceReadError(f"{path}: not a readable Arrow file ({_one_line(err)})") from None
    elif _suffix(path)[1]:
        try:
            with _open(path) as fh:
                fh.read(1)
        except Exception as err:  # noqa: BLE001 - a broken compressed stream
            raise SourceReadError(f"{path}: cannot decompress ({_one_line(err)})") from None


def fingerprint(path: str) -> dict:
    """What the manifest records of an input: sha256 of a local file; the size and ETag of an
    object in a store (reading a large pool back to hash it would cost a download)."""
    if storage.is_remote(path):
        return {"path": path, **storage.info(path), "sha256": None}
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    st = os.stat(path)
    return {"path": os.path.abspath(path), "bytes": st.st_size, "sha256": h.hexdigest()}


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())[:300]


CHUNK_BYTES = 8 << 20  # on Dask a partition holds one piece's rows: the piece size bounds a worker's memory


def jsonl_chunks(path: str, target: int = CHUNK_BYTES) -> list[tuple[int, int, int]]:
    """(start byte, end byte, first line number) of newline-aligned pieces of about ``target``
    bytes of a local, uncompressed JSON lines file, so one big file is read by many workers
    (one piece: a compressed file, a URL, or a small file). One pass counts the lines, so
    rows keep their line numbers for rejects/."""
    if storage.is_remote(path) or _suffix(path)[1] or os.path.getsize(path) <= target:
        return [(0, -1, 1)]
    size, chunks, start, line = os.path.getsize(path), [], 0, 1
    with open(path, "rb") as fh:
        while start < size:
            end = min(start + target, size)
            if end < size:
                fh.seek(end)
                end += len(fh.readline())  # to the end of the line the cut fell in
            fh.seek(start)
            lines, left = 0, end - start
            while left > 0:
                block = fh.read(min(left, 1 << 24))
                lines += block.count(b"\n")
                left -= len(block)
            chunks.append((start, end, line))
            start, line = end, line + lines
    return chunks


def iter_jsonl(path: str, start: int = 0, end: int = -1, first_line: int = 1) -> Iterator[RawRow]:
    """Rows of a JSON lines file, or of its byte range ``[start, end)`` (see ``jsonl_chunks``)."""
    for number, line in jsonl_lines(path, start, end, first_line):
        yield parse_line(path, number, line)


def jsonl_lines(path: str, start: int = 0, end: int = -1, first_line: int = 1) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of each row of a JSON lines file or byte range, not yet parsed: the
    line as written, without its end of line; blank lines are not rows."""
    if start or end >= 0:
        with open(path, "rb") as fh:
            fh.seek(start)
            yield from _numbered(_split_lines(fh, end - start), first_line)
        return
    with _open(path) as fh:
        yield from _numbered(_split_lines(fh, None), first_line)


LINE_BLOCK = 4 << 20


def _split_lines(fh, left: int | None):
    """The lines of a binary file object (``left`` bytes of it, or all), read a block at a time:
    splitting a block is several times faster than iterating the file line by line."""
    rest = b""
    while left is None or left > 0:
        block = fh.read(LINE_BLOCK if left is None else min(LINE_BLOCK, left))
        if not block:
            break
        if left is not None:
            left -= len(block)
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


def _numbered(lines, first_line: int) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(lines, start=first_line):
        line = line.rstrip(b"\r\n")  # the raw row kept in rejects/ is the line as written
        if line.strip():
            yield number, line


def parse_line(path: str, number: int, line: bytes) -> RawRow:
    """One JSON line to a row, or to a bad row with its reason."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        return RawRow(path, number, bad_reason="undecodable_bytes", bad_detail=_one_line(err),
                      raw_text=line.decode("utf-8", "backslashreplace"))
    try:
        return RawRow(path, number, value=json.loads(text))
    except json.JSONDecodeError as err:
        return RawRow(path, number, bad_reason="malformed_json", bad_detail=_one_line(err), raw_text=text)


def iter_json(path: str) -> Iterator[RawRow]:
    with _open(path) as fh:
        data = fh.read()
    # surrogateescape keeps undecodable bytes inside strings; records.py rejects those rows.
    try:
        rows = json.loads(data.decode("utf-8-sig", "surrogateescape"))
    except json.JSONDecodeError as err:
        raise SourceReadError(f"{path}: not valid JSON ({_one_line(err)}); "
                              f"for one object per line use a .jsonl suffix or format: jsonl") from None
    if not isinstance(rows, list):
        raise SourceReadError(f"{path}: expected a JSON list of rows, found a {type(rows).__name__}")
    for number, row in enumerate(rows, start=1):
        yield RawRow(path, number, value=row)


def iter_parquet(path: str, batch_size: int = 4096) -> Iterator[RawRow]:
    number = 0
    for table in parquet_batches(path, batch_size):
        for row in table.to_pylist():
            number += 1
            yield RawRow(path, number, value=row)


def parquet_batches(path: str, batch_size: int = 4096):
    """A Parquet file's rows as tables of up to ``batch_size`` rows, in order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(storage.open_file(path) if storage.is_remote(path) else path)
        for batch in pf.iter_batches(batch_size=batch_size):
            yield pa.Table.from_batches([batch])
    except OSError as err:
        raise SourceReadError(f"{path}: cannot read Parquet ({_one_line(err)})") from None


def _arrow_reader(path: str):
    """An Arrow IPC reader: the streaming form ``datasets`` writes, else the file form."""
    import pyarrow as pa

    def source():
        return pa.PythonFile(storage.open_file(path)) if storage.is_remote(path) else pa.memory_map(path)

    try:
        return pa.ipc.open_stream(source())
    except pa.ArrowInvalid:
        return pa.ipc.open_file(source())


def iter_arrow(path: str) -> Iterator[RawRow]:
    reader = _arrow_reader(path)
    batches = reader if hasattr(reader, "__iter__") else (reader.get_batch(i) for i in range(reader.num_record_batches))
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield RawRow(path, number, value=row)


def iter_file(path: str, fmt: str, piece: tuple[int, int, int] | None = None) -> Iterator[RawRow]:
    """A file's rows; ``piece``: only that byte range of a JSON lines file (``jsonl_chunks``)."""
    readers = {"jsonl": iter_jsonl, "json": iter_json, "parquet": iter_parquet, "arrow": iter_arrow}
    if fmt not in readers:
        raise SourceReadError(f"{path}: unknown format {fmt!r}")
    yield from read_errors(path, iter_jsonl(path, *piece) if piece is not None else readers[fmt](path))


def read_errors(path: str, items: Iterable):
    """``items`` as they come; a broken file's error becomes one ``SourceReadError`` naming it."""
    try:
        yield from items
    except SourceReadError:
        raise
    except (OSError, EOFError, ValueError) as err:  # a truncated or corrupt file, compressed or Arrow
        raise SourceReadError(f"{path}: {_one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - zstandard.ZstdError and the like: still one file's problem
        if type(err).__module__.split(".")[0] in ("zstandard", "pyarrow", "lzma", "bz2", "gzip", "zlib"):
            raise SourceReadError(f"{path}: {_one_line(err)}") from None
        raise


def _sample_hash(seed: int, source: str, key: bytes) -> int:
    h = hashlib.blake2b(digest_size=8, key=str(seed).encode())
    h.update(source.encode("utf-8"))
    h.update(b"\x00")
    h.update(key)
    return int.from_bytes(h.digest(), "big")


def sample_rows(rows: Iterable[RawRow], source: str, mode: str, n: int | None,
                fraction: float | None, seed: int) -> Iterator[RawRow]:
    """Apply a job's sampling to one source's rows.

    ``head``: the first n rows (files in sorted order). ``random``: a seeded
    sample chosen by a hash of each row's content, so the same rows are chosen
    whatever the file order: with ``n``, the n rows of smallest hash (exactly n);
    with ``fraction``, each row whose hash falls below the fraction.
    """
    if mode == "none":
        yield from rows
    elif mode == "head":
        yield from itertools.islice(rows, n)
    elif fraction is not None:
        limit = int(fraction * 2**64)
        for row in rows:
            if _sample_hash(seed, source, row.sample_key()) < limit:
                yield row
    else:
        heap: list[tuple[int, int, RawRow]] = []  # max-heap on (-hash, -position)
        for pos, row in enumerate(rows):
            item = (-_sample_hash(seed, source, row.sample_key()), -pos, row)
            if len(heap) < n:
                heapq.heappush(heap, item)
            elif item[:2] > heap[0][:2]:
                heapq.heapreplace(heap, item)
        yield from (row for _, _, row in sorted(heap, key=lambda t: (-t[1])))
