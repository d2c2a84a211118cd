"""Where training rows come from: the built-in sample, local files, folders, globs, or a hub dataset.

    >>> from ftcli.data.sources import load_rows, source_fingerprint
    >>> rows = load_rows("builtin:alpaca-sample")
    >>> rows.source_kind, len(rows.dataset)
    ('builtin', 400)
    >>> source_fingerprint("data/*.jsonl")  # cheap: the files' sha256 (recorded once hashed), parses nothing
    'sha256:...'

Local files: `.jsonl` (one object per line), `.json` (an array of objects, or `{"split": [...]}`),
`.csv` (header row), `.parquet`, `.txt` (one example per non-blank line, column `text`). A folder
holding such files directly, or a glob (`data/*.jsonl`, `data/**/*.csv`), reads them all in
sorted order. A folder laid out like a hub dataset repository (a `README.md` or a `data/`
sub-folder, as `hf download --repo-type dataset` leaves it) is read by `datasets.load_dataset`,
exactly like a hub id, honouring `--dataset-split`.

Text files are UTF-8 (a byte-order mark, as Excel and Notepad write it, is skipped); a byte that is not UTF-8, or
a JSON escape of a lone surrogate (`"\\ud800"`, half an emoji), is refused naming its file and line (`check_text`,
the rule every reader of text follows: prompts files, `--prompt`, chat input). `load_rows`
reads each local file once and fingerprints the bytes it parsed; it also records each distinct set of
keys its rows have (`RowShape`), so that a folder or file mixing formats is refused rather than read
as one format (`ftcli.data.formats.check_one_format`). Values nested too deeply to store are a
DataError naming the file and row, like every other malformed input.

The fingerprint changes whenever the content changes: the bytes of every local file (and its
name relative to the source), the rows of a built-in set, or the hub dataset's resolved files
and revision. A file is hashed in full once; the hash is then reused while the file's size, times, inode and a
sample of its content are unchanged (`ftcli.data.digests`). Every failure is a `DataError` naming the file and line
(or hub id) and the fix.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ftcli.builtin import builtin_dataset_rows, is_builtin
from ftcli.data.digests import file_sha256, remember
from ftcli.data.streaming import stream_jsonl, streamable
from ftcli.errors import DataError

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
GLOB_CHARS = ("*", "?", "[")


@dataclass
class LoadedRows:
    dataset: Any  # datasets.Dataset
    source_kind: str  # "builtin" | "local" | "hub"
    fingerprint: str  # changes whenever the data's content changes
    files: list[str] | None = None  # the local files read, in order
    shapes: list[RowShape] | None = None  # local rows by their set of keys (how formats are told apart)
    scratch: Path | None = None  # where large JSONL rows were written as Arrow (the caller removes it)


@dataclass
class RowShape:
    """Rows of one local file that share a set of non-empty keys: `rows` of them, the first is row `first`."""

    file: str
    first: int
    rows: int
    keys: frozenset[str]


def source_kind(ref: str) -> str:
    """builtin | local (file, folder of files, glob) | hub (hub id, or a local copy of a hub repository)."""
    if is_builtin(ref):
        return "builtin"
    path = Path(ref).expanduser()
    if path.is_dir() and _is_hub_layout(path):
        return "hub"
    if path.exists() or any(c in ref for c in GLOB_CHARS) or path.suffix.lower() in LOCAL_SUFFIXES \
            or ref.startswith((".", "/", "~")):
        return "local"
    return "hub"


def _is_hub_layout(folder: Path) -> bool:
    return (folder / "README.md").is_file() or (folder / "data").is_dir()


def local_files(ref: str) -> list[Path]:
    """The data files a local reference names, sorted; a DataError when there are none."""
    path = Path(ref).expanduser()
    if any(c in ref for c in GLOB_CHARS) and not path.exists():
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
        files = [p for p in found if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES]
        if not files:
            raise DataError(f"--dataset {ref} matches no {'/'.join(LOCAL_SUFFIXES)} file",
                            hint="check the pattern (quote it so the shell does not expand it)")
        return files
    if not path.exists():
        raise DataError(f"dataset file {path} does not exist", hint="check the path given to --dataset")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES)
        if not files:
            found = sorted(p.name for p in path.iterdir())[:8]
            raise DataError(f"dataset folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} file "
                            f"(found: {', '.join(found) or 'nothing'})",
                            hint="put the data files directly in the folder, or pass one file")
        return files
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(f"dataset file {path} has an unsupported type '{path.suffix}'",
                        hint="use .jsonl, .json, .csv, .parquet or .txt")
    if not path.is_file():  # a device or a pipe, perhaps behind a symlink (/dev/zero would be read forever)
        where = f" (a link to {path.resolve()})" if path.is_symlink() else ""
        raise DataError(f"dataset file {path} is not a regular file{where}",
                        hint="pass a data file (copy a stream to a file first)")
    return [path]


def source_fingerprint(ref: str, *, split: str = "train", revision: str | None = None) -> str | None:
    """The content fingerprint, computed without parsing the data; None for hub sources (needs loading)."""
    kind = source_kind(ref)
    if kind == "builtin":
        try:
            rows = builtin_dataset_rows(ref)
        except ValueError as exc:
            raise DataError(str(exc), hint="use builtin:alpaca-sample, a local data file or a hub id") from None
        return "sha256:" + hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    if kind == "local":
        files = local_files(ref)
        return combined_fingerprint(ref, files, [_file_digest(f) for f in files])
    path = Path(ref).expanduser()
    if path.is_dir():  # a local copy of a hub repository: its files are the content
        h = hashlib.sha256(f"{split}\0".encode())
        for f in sorted(p for p in path.rglob("*") if p.is_file() and ".git" not in p.parts
                        and ".cache" not in p.parts):
            h.update(str(f.relative_to(path)).encode() + b"\0" + _file_digest(f).encode() + b"\0")
        return "sha256:" + h.hexdigest()
    return None


def combined_fingerprint(ref: str, files: list[Path], digests: list[str]) -> str:
    """The fingerprint of a local source from its files' digests (one file: its digest; several: their
    names relative to the source and digests)."""
    if len(files) == 1:
        return "sha256:" + digests[0]
    h = hashlib.sha256()
    base = Path(ref).expanduser() if Path(ref).expanduser().is_dir() else None
    for f, digest in zip(files, digests):
        name = str(f.relative_to(base)) if base else str(f)
        h.update(name.encode() + b"\0" + digest.encode() + b"\0")
    return "sha256:" + h.hexdigest()


def _file_digest(path: Path) -> str:
    return file_sha256(path)  # recorded once hashed, while the file is unchanged (ftcli.data.digests)


def load_rows(ref: str, *, split: str = "train", revision: str | None = None,
              scratch: Callable[[], Path] | None = None) -> LoadedRows:
    """The rows of `ref`. A local file is read once: its fingerprint is the hash of the very bytes parsed.

    With `scratch` (a function that makes an empty folder, or gives None), large JSONL files are read in chunks into an Arrow
    file there (`ftcli.data.streaming`) instead of into memory; `LoadedRows.scratch` names it."""
    kind = source_kind(ref)
    if kind == "builtin":
        fingerprint = source_fingerprint(ref)
        return LoadedRows(_dataset_from_rows(builtin_dataset_rows(ref), ref), "builtin", fingerprint or "")
    if kind == "local":
        files = local_files(ref)
        folder = scratch() if scratch is not None and streamable(files) else None  # None: no room for it
        streamed = stream_jsonl(files, folder, _parse_jsonl, row_shapes) if folder is not None else None
        if streamed is not None:
            dataset, digests, found = streamed
            return LoadedRows(dataset, "local", combined_fingerprint(ref, files, digests), [str(f) for f in files],
                              found, folder)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        rows: list[dict[str, Any]] = []
        digests: list[str] = []
        shapes: list[RowShape] = []
        for f in files:
            before = _stat(f)
            data = _read_bytes(f)
            digests.append(hashlib.sha256(data).hexdigest())
            if before is not None:
                remember(f, digests[-1], before)
            file_rows = parse_local_rows(f, data)
            shapes.extend(row_shapes(str(f), file_rows))
            rows.extend(file_rows)
        counts = [(str(f), sum(sh.rows for sh in shapes if sh.file == str(f))) for f in files]
        return LoadedRows(_dataset_from_rows(rows, ref, counts), "local", combined_fingerprint(ref, files, digests),
                          [str(f) for f in files], shapes)
    return _load_hub(ref, split=split, revision=revision)


def _stat(path: Path) -> Any:
    try:
        return path.stat()
    except OSError:
        return None


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except IsADirectoryError:
        raise DataError(f"dataset file {path} is a folder", hint="pass a data file or the folder itself") from None
    except OSError as exc:
        raise DataError(f"cannot read dataset file {path}: {exc.strerror or exc}",
                        hint="check the file's permissions") from None


def row_shapes(file: str, rows: list[dict[str, Any]]) -> list[RowShape]:
    """Each distinct set of non-empty keys among `rows`, with the first row that has it and how many do."""
    found: dict[frozenset[str], RowShape] = {}
    for i, row in enumerate(rows, start=1):
        keys = frozenset(k for k, v in row.items() if v is not None)
        shape = found.get(keys)
        if shape is None:
            found[keys] = RowShape(file, i, 1, keys)
        else:
            shape.rows += 1
    return list(found.values())


def _dataset_from_rows(rows: list[dict[str, Any]], ref: str, files: list[tuple[str, int]] | None = None) -> Any:
    """Rows -> Dataset; columns are the union of every row's keys (a missing key reads as None).

    `files`: (file, number of rows) in order, to name the file of a bad row."""
    import pyarrow as pa
    from datasets import Dataset

    from ftcli.data.formats import as_nested_json

    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    # Tool schemas differ from row to row: as one Arrow type every schema would get every other's keys (as null).
    if "tools" in columns:
        columns["tools"] = [as_nested_json(v) for v in columns["tools"]]
    try:
        return Dataset.from_dict(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, RecursionError):
        if _first_too_deep(rows) is not None:
            columns = {}  # the refusal below names the row
        # Messages of different shapes (content as a string here, as parts there): a column of lists or objects
        # only is kept as JSON text, read back as it was by ftcli.data.formats.nested (one that mixes them with
        # plain values stays refused below).
        columns = {name: [as_nested_json(v) for v in values] if all(isinstance(v, (list, dict)) or v is None
                                                                    for v in values) else values
                   for name, values in columns.items()}
    try:
        if not columns:
            raise RecursionError("too deep")
        return Dataset.from_dict(columns)
    except (pa.ArrowInvalid, pa.ArrowTypeError, RecursionError) as exc:
        deep = _first_too_deep(rows)
        if deep is not None:
            raise DataError(f"{_row_place(ref, files, deep[0])}: a value is nested {deep[1]} levels deep, too deep "
                            f"to store", hint="flatten the data: a row holds text fields and lists of messages") \
                from None
        where = _first_mixed_type(rows, list(names))
        raise DataError(f"dataset {ref}: {where or 'a column mixes value types'} ({str(exc).splitlines()[0]})",
                        hint="give each column one type in every row (e.g. always a string)") from None


MAX_NESTING = 64  # far beyond any real row (a list of message objects is 3 levels); Arrow refuses ~200


def _first_too_deep(rows: list[dict[str, Any]]) -> tuple[int, int] | None:
    """(row index, depth) of the first row nested deeper than MAX_NESTING, measured without recursion."""
    for i, row in enumerate(rows):
        stack = [(row, 1)]
        while stack:
            value, depth = stack.pop()
            if depth > MAX_NESTING:
                return i, _depth(row)
            children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return None


def _depth(value: Any) -> int:
    best, stack = 0, [(value, 1)]
    while stack:
        value, depth = stack.pop()
        best = max(best, depth)
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return best


def _row_place(ref: str, files: list[tuple[str, int]] | None, index: int) -> str:
    """`data/b.jsonl: row 3` for row `index` (0-based) of all the rows read."""
    for name, count in files or []:
        if index < count:
            return f"{name}: row {index + 1}"
        index -= count
    return f"dataset {ref}: row {index + 1}"


def _first_mixed_type(rows: list[dict[str, Any]], names: list[str]) -> str | None:
    """`row 7: 'messages' is a str, but a list in row 1` for the first value whose JSON kind differs."""
    def kind(value: Any) -> str:
        return "number" if isinstance(value, (int, float)) and not isinstance(value, bool) else type(value).__name__

    for name in names:
        first: tuple[int, str] | None = None
        for i, row in enumerate(rows):
            value = row.get(name)
            if value is None:
                continue
            if first is None:
                first = (i, kind(value))
            elif kind(value) != first[1]:
                return f"row {i + 1}: '{name}' is a {kind(value)}, but a {first[1]} in row {first[0] + 1}"
    return None


def read_local_rows(path: Path) -> list[dict[str, Any]]:
    """Read one local data file into row dicts, naming the file and line of anything malformed."""
    return parse_local_rows(path, _read_bytes(path))


def parse_local_rows(path: Path, data: bytes) -> list[dict[str, Any]]:
    """The rows of local file `path`, whose content is `data` (a UTF-8 byte-order mark is skipped)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, data)
    try:
        text = data.decode("utf-8-sig", errors="strict")  # "-sig": a BOM (Excel's CSV, Notepad) is not data
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8", hint="save the file as UTF-8") from None
    try:
        if suffix == ".jsonl":
            return _parse_jsonl(path, text)
        if suffix == ".csv":
            return _parse_csv(path, text)
        if suffix == ".txt":
            return [{"text": line} for line in text.splitlines() if line.strip()]
        return _parse_json(path, text)
    except RecursionError:
        raise DataError(f"{path}: a value is nested too deeply to read (lists or objects inside each other "
                        f"hundreds of levels deep)", hint="flatten the data: a row holds text fields and "
                                                          "lists of messages") from None


def unencodable(value: Any) -> str | None:
    """What in `value` (a string, or lists and objects of them) no tokenizer can encode, or None: a lone UTF-16
    surrogate (a JSON escape such as "\\ud800", half of an emoji cut by a scraper) or, read from the command line or
    stdin, a byte that is not UTF-8 (Python keeps it as a surrogate). Every reader of text refuses it (`check_text`)."""
    stack = [(value, "")]
    while stack:
        item, name = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(item[exc.start])
                what = f"byte 0x{code - 0xDC00:02x}, which is not UTF-8" if 0xDC80 <= code <= 0xDCFF else \
                    f"a lone surrogate \\u{code:04x}, which is not a character"
                return f"{name + ': ' if name else ''}{what} (at character {exc.start + 1})"
        elif isinstance(item, dict):
            stack.extend((v, name or repr(k)) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend((v, name) for v in reversed(item))
    return None


def check_text(value: Any, where: str) -> None:
    """Refuse text that cannot be encoded as UTF-8 (see `unencodable`), naming `where` (file and line or row)."""
    problem = unencodable(value)
    if problem is not None:
        raise DataError(f"{where}: {problem}", hint="fix or delete that text, and save the data as UTF-8 (a surrogate "
                                                    "pair's two halves must stay together)")


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a JSON escape of \uD800-\uDFFF (valid pairs pass check_text)


def _maybe_surrogate(text: str) -> bool:
    return "\\u" in text and SURROGATE_ESCAPE.search(text) is not None


def _parse_json(path: Path, text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} at column {exc.colno}",
                        hint="the file is not valid JSON; fix it at that line") from None
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), list):
        data = next(iter(data.values()))  # {"train": [...]} style wrappers
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()) \
            and len({len(v) for v in data.values()}) == 1:
        data = [dict(zip(data, values)) for values in zip(*data.values())]  # {"col": [...], ...} (pandas "list")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON array of objects (or an object of equal-length columns)",
                        hint="write [{\"instruction\": ...}, ...], or use .jsonl with one object per line")
    if _maybe_surrogate(text):
        for i, row in enumerate(data, start=1):
            check_text(row, f"{path}: row {i}")
    return data


def _parse_jsonl(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except RecursionError:
            raise DataError(f"{path}:{lineno}: a value is nested too deeply to read (lists or objects inside "
                            "each other hundreds of levels deep)",
                            hint="flatten the data: a row holds text fields and lists of messages") from None
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON: {exc.msg} at column {exc.colno}",
                            hint="that line is not valid JSON; fix or delete it") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}",
                            hint="write one {\"instruction\": ..., \"output\": ...} object per line")
        if _maybe_surrogate(line):
            check_text(row, f"{path}:{lineno}")
        rows.append(row)
    return rows


def _parse_csv(path: Path, text: str) -> list[dict[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if not header:
            return []
        rows = []
        for record in reader:
            if not record or not any(v.strip() for v in record):
                continue
            if len(record) != len(header):
                raise DataError(f"{path}:{reader.line_num}: {len(record)} fields, the header has {len(header)}",
                                hint="quote fields that contain commas or line breaks")
            rows.append(dict(zip(header, record)))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: invalid CSV: {exc}", hint="fix the file at that line") from None
    return rows


def _read_parquet(path: Path, data: bytes) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})",
                        hint="write it again, e.g. with pandas.DataFrame.to_parquet") from None


def _load_hub(ref: str, *, split: str, revision: str | None) -> LoadedRows:
    import datasets

    from ftcli.models import hub_offline

    local = Path(ref).expanduser()
    before = source_fingerprint(ref, split=split, revision=revision) if local.is_dir() else None
    try:
        ds = datasets.load_dataset(str(local) if local.is_dir() else ref, split=split, revision=revision)
    except FileNotFoundError:
        raise DataError(f"dataset {ref} is neither a local file nor a dataset in the local cache or on the hub",
                        hint="check the path or id; offline, pass a local data file") from None
    except ConnectionError:
        if hub_offline():
            raise DataError(f"dataset {ref} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it",
                            hint="pass a local data file or folder, or unset HF_HUB_OFFLINE") from None
        raise DataError(f"dataset {ref} is not in the local cache and the hub is unreachable",
                        hint="pass a local data file, or download it on a connected machine and set "
                             "HF_HUB_OFFLINE=1") from None
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(f"dataset {ref} has no split '{split}'", hint="pick one with --dataset-split") from None
        raise DataError(f"cannot load dataset {ref}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # the hub client raises many unrelated types; keep it to one line
        if hub_offline() or "offline" in str(exc).lower():
            raise DataError(f"dataset {ref} is not in the local cache and HF_HUB_OFFLINE=1 forbids downloading it",
                            hint="pass a local data file or folder, or unset HF_HUB_OFFLINE") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"cannot load dataset {ref}: {type(exc).__name__}: {first}") from None
    fingerprint = source_fingerprint(ref, split=split, revision=revision) if local.is_dir() else None
    if fingerprint != before:  # datasets read the files apart from our hash: the rows may be of neither version
        raise DataError(f"dataset folder {ref} changed while it was read",
                        hint="run again once nothing writes to it")
    # datasets' own fingerprint follows the resolved data files, and so the hub revision's commit.
    return LoadedRows(ds, "hub", fingerprint or f"hub:{ref}@{revision or 'default'}/{split}:{ds._fingerprint}")
