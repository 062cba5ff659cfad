"""Readers of raw interaction files into `(users, items, timestamps)` numpy arrays.

MovieLens files are all-numeric, so they are parsed in large byte chunks by `np.fromstring`
(about 2M rows/s); a chunk that fails the fast parse is re-scanned line by line only to name the
offending line. Token formats (RecBole `.inter`, generic CSV) go through the `csv` module; tokens become ints in
order of first appearance, unless every token of a column is a plain integer (then its value).
`read_events_with_tokens` also returns the item token strings in that case (`tokens[code]`), so
the ids of the data file can be given back (see `cprec.data.dataset.item_raw_ids`).
"""

from __future__ import annotations

import contextlib
import csv
import gc
import itertools
import math
import operator
import pathlib
from collections.abc import Iterator

import numpy as np

from cprec.errors import DataError

Events = tuple[np.ndarray, np.ndarray, np.ndarray]
"""users int64, items int64, timestamps float64, one entry per interaction in file order."""

FORMATS = ("movielens-100k", "movielens-dat", "movielens-csv", "recbole", "csv")

_CHUNK_BYTES = 32 << 20
_CSV_CHUNK_ROWS = 1 << 20


def read_events(
    path: str | pathlib.Path,
    fmt: str,
    *,
    sep: str = ",",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
) -> Events:
    """Reads `path` in format `fmt` (one of `FORMATS`)."""
    return read_events_with_tokens(path, fmt, sep=sep, user_col=user_col, item_col=item_col, time_col=time_col)[0]


def read_events_with_tokens(
    path: str | pathlib.Path,
    fmt: str,
    *,
    sep: str = ",",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
) -> tuple[Events, list[str] | None]:
    """`read_events` plus the item tokens: `tokens[code]` is the file's text of item code `code`.

    None when the items are the file's integer values already (MovieLens formats, or token
    columns whose every token is a plain integer).
    """
    if fmt == "recbole":
        return _read_table(path, "\t", (user_col, item_col, time_col), quoting=csv.QUOTE_NONE)
    if fmt == "csv":
        _check_sep(sep)
        return _read_table(path, sep, (user_col, item_col, time_col), quoting=csv.QUOTE_MINIMAL)
    if fmt == "movielens-100k":
        return read_movielens_100k(path), None
    if fmt == "movielens-dat":
        return read_movielens_dat(path), None
    if fmt == "movielens-csv":
        return read_movielens_csv(path), None
    raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMATS)}")


def read_movielens_100k(path: str | pathlib.Path) -> Events:
    """MovieLens 100K `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp`, no header."""
    names = ("user id", "item id", "rating", "timestamp")
    return _read_numeric(path, _read_bytes(path), b"\t", names, (0, 1, 3), first_line=1)


def read_movielens_dat(path: str | pathlib.Path) -> Events:
    """MovieLens 1M/10M `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header."""
    names = ("UserID", "MovieID", "Rating", "Timestamp")
    return _read_numeric(path, _read_bytes(path), b"::", names, (0, 1, 3), first_line=1)


def read_movielens_csv(path: str | pathlib.Path) -> Events:
    """MovieLens 20M/latest `ratings.csv`: header `userId,movieId,rating,timestamp`."""
    data = _read_bytes(path)
    head, _, body = data.partition(b"\n")
    names = tuple(h.strip() for h in head.decode("utf-8", "replace").strip("\r\ufeff").split(","))
    hint = "fix the header, or read it with data.format='csv' and data.user_col/item_col/time_col"
    cols = _find_columns(path, names, ("userId", "movieId", "timestamp"), hint)
    return _read_numeric(path, body, b",", names, cols, first_line=2)


def read_recbole(
    path: str | pathlib.Path,
    *,
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
) -> Events:
    """RecBole atomic `.inter` file: tab separated, header of `name:type` fields, token ids."""
    return _read_table(path, "\t", (user_col, item_col, time_col), quoting=csv.QUOTE_NONE)[0]


def read_csv(
    path: str | pathlib.Path,
    *,
    sep: str = ",",
    user_col: str = "user_id",
    item_col: str = "item_id",
    time_col: str = "timestamp",
) -> Events:
    """Generic CSV/TSV with a header naming the columns; ids are arbitrary tokens.

    An empty `time_col` keeps the file order as the time order.
    """
    _check_sep(sep)
    return _read_table(path, sep, (user_col, item_col, time_col), quoting=csv.QUOTE_MINIMAL)[0]


def _check_sep(sep: str) -> None:
    if len(sep) != 1:
        raise DataError(f"csv separator must be one character, got {sep!r}; set data.sep")


def _file_error(path, e: OSError) -> DataError:
    if isinstance(e, FileNotFoundError):
        return DataError(f"data file {path} not found; check data.path")
    if isinstance(e, IsADirectoryError):
        return DataError(f"data path {path} is a directory; point data.path at the file")
    return DataError(f"cannot read data file {path} ({e.strerror}); check its permissions")


def _read_bytes(path: str | pathlib.Path) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise _file_error(path, e) from None


_COLUMNS_HINT = "fix the header or set data.user_col/item_col/time_col/sep"


def _find_columns(
    path, names: tuple[str, ...], wanted: tuple[str, ...], hint: str = _COLUMNS_HINT
) -> tuple[int, ...]:
    """Indices of `wanted` columns; RecBole headers match on the name before `:type`."""
    bare = [n.split(":", 1)[0] for n in names]
    cols = []
    for w in wanted:
        if w in names:
            cols.append(names.index(w))
        elif w in bare:
            cols.append(bare.index(w))
        else:
            found = ", ".join(repr(n) for n in names)
            raise DataError(f"{path} has no column {w!r} (columns found: {found}); {hint}")
    return tuple(cols)


def _read_numeric(
    path, body: bytes, sep: bytes, names: tuple[str, ...], cols: tuple[int, int, int], first_line: int
) -> Events:
    """Parses an all-numeric delimited body chunk by chunk; returns the three wanted columns."""
    if body and not body.endswith(b"\n"):
        body += b"\n"
    ncols = len(names)
    parts: list[np.ndarray] = []
    line_no, start = first_line, 0
    while start < len(body):
        end = body.rfind(b"\n", start, start + _CHUNK_BYTES) + 1 if start + _CHUNK_BYTES < len(body) else 0
        end = end or len(body)
        chunk = body[start:end]
        n_lines = chunk.count(b"\n")
        rows = _fast_parse(chunk, sep, ncols, n_lines, cols)
        if rows is None:
            rows = _slow_parse(path, chunk, sep, names, cols, line_no)
        parts.append(rows[:, list(cols)])
        line_no += n_lines
        start = end
    table = np.concatenate(parts) if parts else np.zeros((0, 3))
    return table[:, 0].astype(np.int64), table[:, 1].astype(np.int64), table[:, 2].copy()


def _fast_parse(chunk: bytes, sep: bytes, ncols: int, n_lines: int, cols) -> np.ndarray | None:
    """Vectorized parse; None when anything looks off (then the slow path names the line)."""
    # Totals only: a short line next to a long one would slip through, but not past the id checks.
    if chunk.count(sep) != (ncols - 1) * n_lines:
        return None
    text = chunk if sep.isspace() else chunk.replace(sep, b" ")
    try:
        values = np.fromstring(text, dtype=np.float64, sep=" ")
    except ValueError:
        return None
    if values.size != ncols * n_lines:
        return None
    rows = values.reshape(n_lines, ncols)
    ids = rows[:, [cols[0], cols[1]]]
    if not (np.all(ids == np.floor(ids)) and np.all(np.isfinite(rows[:, cols[2]]))):
        return None
    return rows


def _slow_parse(path, chunk: bytes, sep: bytes, names, cols, line_no: int) -> np.ndarray:
    """Line-by-line parse of a chunk that failed the fast path; raises on the first bad field."""
    rows = []
    sep_text = sep.decode()
    for offset, raw in enumerate(chunk.split(b"\n")[:-1]):
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            continue
        where = f"{path} line {line_no + offset}"
        fields = line.split(sep_text) if not sep.isspace() else line.split()
        if len(fields) != len(names):
            raise DataError(
                f"{where}: expected {len(names)} fields separated by {sep_text!r}, found {len(fields)}; "
                "fix or remove that line"
            )
        row = []
        for j, field in enumerate(fields):
            kind = "id" if j in cols[:2] else "timestamp" if j == cols[2] else "number"
            row.append(_parse_field(field.strip(), kind, f"{where}, column {j + 1} ({names[j]})"))
        rows.append(row)
    if not rows:
        return np.zeros((0, len(names)))
    return np.asarray(rows, dtype=np.float64)


def _parse_field(text: str, kind: str, where: str) -> float:
    try:
        value = int(text) if kind == "id" else float(text)
    except ValueError:
        what = {"id": "an integer id", "timestamp": "a numeric timestamp", "number": "a number"}[kind]
        raise DataError(f"{where}: {text[:40]!r} is not {what}; fix or remove that line") from None
    if kind == "timestamp" and not math.isfinite(value):
        raise DataError(f"{where}: {text!r} is not a finite timestamp; fix or remove that line")
    return float(value)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Millions of short-lived row lists would trigger the cyclic GC over and over, each pass scanning them all."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _TokenIds(dict):
    """Maps tokens to consecutive ints in order of first appearance."""

    def __missing__(self, key: str) -> int:
        value = self[key] = len(self)
        return value


def _read_table(path, sep: str, wanted: tuple[str, str, str], quoting: int) -> tuple[Events, list[str] | None]:
    """Reads token ids and numeric timestamps of a delimited text file with a header; also the
    item tokens by code (None when the items keep their integer values)."""
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise _file_error(path, e) from None
    user_col, item_col, time_col = wanted
    users, items = _TokenIds(), _TokenIds()
    u_parts, i_parts, t_parts = [], [], []
    with f, _gc_paused():
        reader = csv.reader(f, delimiter=sep, quoting=quoting, skipinitialspace=True)
        try:
            header = tuple(h.strip() for h in next(reader, []))
            cols = _find_columns(path, header, (user_col, item_col) + ((time_col,) if time_col else ()))
            first_line = 2
            while rows := list(itertools.islice(reader, _CSV_CHUNK_ROWS)):
                lines = first_line + np.arange(len(rows))
                first_line += len(rows)
                if min(map(len, rows)) <= max(cols):
                    rows, lines = _drop_blank(path, rows, lines, max(cols))
                    if not rows:
                        continue
                columns = list(zip(*map(operator.itemgetter(*cols), rows)))
                for k in (0, 1):
                    if "" in columns[k]:
                        bad = lines[columns[k].index("")]
                        raise DataError(f"{path} line {bad}: empty {header[cols[k]]!r}; fix or remove that line")
                u_parts.append(np.fromiter(map(users.__getitem__, columns[0]), np.int64, len(rows)))
                i_parts.append(np.fromiter(map(items.__getitem__, columns[1]), np.int64, len(rows)))
                if time_col:
                    t_parts.append(_timestamps(path, columns[2], lines, header[cols[2]]))
        except UnicodeDecodeError as e:
            raise DataError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num}: malformed CSV ({e}); fix that line") from None
    u, _ = _token_values(np.concatenate(u_parts) if u_parts else np.zeros(0, np.int64), users)
    i, item_tokens = _token_values(np.concatenate(i_parts) if i_parts else np.zeros(0, np.int64), items)
    t = np.concatenate(t_parts) if t_parts else np.arange(len(u), dtype=np.float64)
    return (u, i, t), item_tokens


def _token_values(codes: np.ndarray, ids: dict[str, int]) -> tuple[np.ndarray, list[str] | None]:
    """Keeps the integer value of tokens when every token is a plain integer, so a RecBole
    copy of a MovieLens file prepares exactly like the original (tokens None); else the
    first-appearance codes and the tokens by code."""
    tokens = list(ids)
    if not all(t.isascii() and t.isdigit() and len(t) < 19 and (t == "0" or t[0] != "0") for t in tokens):
        return codes, tokens
    return np.array(tokens, dtype=np.int64)[codes], None


def _drop_blank(path, rows: list[list[str]], lines: np.ndarray, need: int):
    """Removes blank rows; a short non-blank row is an error naming its line."""
    keep = []
    for k, row in enumerate(rows):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) <= need:
            raise DataError(
                f"{path} line {lines[k]}: expected at least {need + 1} fields, found {len(row)}; "
                "fix that line or set data.sep"
            )
        keep.append(k)
    return [rows[k] for k in keep], lines[keep]


def _timestamps(path, texts: tuple[str, ...], lines: np.ndarray, name: str) -> np.ndarray:
    try:
        times = np.array(texts, dtype=np.float64)
    except ValueError:
        times = None
    if times is not None and np.all(np.isfinite(times)):
        return times
    for text, line in zip(texts, lines):
        _parse_field(text.strip(), "timestamp", f"{path} line {line}, column {name!r}")
    raise DataError(f"{path}: unparsable timestamps in column {name!r}; fix them")  # unreachable in practice
