"""Large JSONL sources read in chunks into one Arrow file on disk, so that reading never holds all rows in memory.

    >>> from ftcli.data.streaming import stream_jsonl
    >>> dataset, digests, shapes = stream_jsonl(files, scratch, parse, shapes_of)   # or None: read them whole
    >>> dataset                                                  # memory-mapped from scratch/rows.arrow

Each file is read in blocks of whole lines, hashed as it is read (the fingerprint is the hash of the very bytes
parsed, as `ftcli.data.sources.load_rows` gives it), parsed line by line and written to Arrow a chunk at a time.
The rows come out exactly as the whole-file reader makes them, or not at all: a malformed line, a byte that is
not UTF-8, or chunks whose columns do not share one Arrow type (a column that is a string here and a number
there, messages of different shapes...) make `stream_jsonl` return None, and the caller reads the files whole,
which names the problem or stores the values as it always has.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterator

from ftcli.data.digests import remember
from ftcli.errors import DataError

STREAM_MIN_BYTES = 32 << 20  # smaller sources are read whole: faster, and nothing is written
BLOCK_BYTES = 8 << 20  # about 20,000 Alpaca rows per chunk


def streamable(files: list[Path]) -> bool:
    """Whether `files` are read in chunks: JSONL only, together at least STREAM_MIN_BYTES."""
    if not files or any(f.suffix.lower() != ".jsonl" for f in files):
        return False
    try:
        return sum(f.stat().st_size for f in files) >= STREAM_MIN_BYTES
    except OSError:
        return False


def _chunks(path: Path, digest: Any) -> Iterator[str]:
    """The decoded text of `path`, a block of whole lines at a time; `digest` sees every byte read."""
    first, rest = True, b""
    with path.open("rb") as fh:
        while True:
            block = fh.read(BLOCK_BYTES)
            digest.update(block)
            data = rest + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            piece, rest = data[:cut], data[cut:]
            if piece:
                yield piece.decode("utf-8-sig" if first else "utf-8", errors="strict")
                first = False
            if not block:
                return


def stream_jsonl(files: list[Path], scratch: Path, parse: Callable[[Path, str], list[dict[str, Any]]],
                 shapes_of: Callable[[str, list[dict[str, Any]]], list[Any]]) -> tuple[Any, list[str], list[Any]] | None:
    """(dataset backed by `scratch/rows.arrow`, each file's sha256, the rows' shapes) of `files`, or None when the
    whole-file reader must decide. `parse(path, text)` reads the rows of some lines, `shapes_of(file, rows)` gives
    their RowShapes (`ftcli.data.sources`)."""
    import pyarrow as pa
    from datasets import Dataset

    names: dict[str, None] = {}
    shapes: list[Any] = []
    digests: list[str] = []
    schema, writer = None, None
    scratch.mkdir(parents=True, exist_ok=True)
    target = scratch / "rows.arrow"
    try:
        with target.open("wb") as sink:
            for f in files:
                before, h, file_rows = f.stat(), hashlib.sha256(), 0
                found: dict[frozenset[str], Any] = {}
                for text in _chunks(f, h):
                    rows = parse(f, text)
                    if not rows:
                        continue
                    for shape in shapes_of(str(f), rows):
                        known = found.get(shape.keys)
                        if known is None:
                            shape.first += file_rows
                            found[shape.keys] = shape
                        else:
                            known.rows += shape.rows
                    file_rows += len(rows)
                    table = _table(rows, names, Dataset)
                    if table is None or (schema is not None and not table.schema.equals(schema)):
                        return None
                    if writer is None:
                        schema = table.schema
                        writer = pa.ipc.new_stream(sink, schema)
                    writer.write_table(table)
                shapes.extend(found.values())
                digests.append(h.hexdigest())
                remember(f, digests[-1], before)
            if writer is None:
                return None
            writer.close()
    except (DataError, UnicodeDecodeError, OSError, RecursionError):
        return None
    return Dataset.from_file(str(target)), digests, shapes


def _table(rows: list[dict[str, Any]], names: dict[str, None], dataset_cls: Any) -> Any:
    """One chunk as Arrow, with every column seen so far (and in the same order), or None when Arrow refuses it
    as the whole-file reader would have it (which then decides)."""
    import pyarrow as pa

    from ftcli.data.formats import as_nested_json

    before = len(names)
    for row in rows:
        names.update(dict.fromkeys(row))
    if before and len(names) != before:
        return None  # a column first seen after the first chunk: the earlier chunks lack it
    columns = {name: [row.get(name) for row in rows] for name in names}
    if "tools" in columns:
        columns["tools"] = [as_nested_json(v) for v in columns["tools"]]
    try:
        return dataset_cls.from_dict(columns).data.table
    except (pa.ArrowInvalid, pa.ArrowTypeError, RecursionError):
        return None
