"""Raw-file readers: each format on a tiny hand-made file, and every DataError case."""

import numpy as np
import pytest

from cprec.data import readers
from cprec.errors import DataError


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _check(events, users, items, times):
    u, i, t = events
    assert u.dtype == np.int64 and i.dtype == np.int64 and t.dtype == np.float64
    np.testing.assert_array_equal(u, users)
    np.testing.assert_array_equal(i, items)
    np.testing.assert_array_equal(t, times)


def test_movielens_100k(tmp_path):
    path = _write(tmp_path, "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n")
    _check(readers.read_movielens_100k(path), [196, 186], [242, 302], [881250949, 891717742])


def test_movielens_dat_without_final_newline(tmp_path):
    path = _write(tmp_path, "ratings.dat", "1::1193::5::978300760\r\n1::661::3::978302109")
    _check(readers.read_movielens_dat(path), [1, 1], [1193, 661], [978300760, 978302109])


def test_movielens_csv_uses_header(tmp_path):
    text = "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n2,1029,3.0,1260759179\n"
    _check(readers.read_movielens_csv(_write(tmp_path, "ratings.csv", text)), [1, 2], [31, 1029], [1260759144, 1260759179])


def test_numeric_reader_chunks_match_and_count_lines(tmp_path, monkeypatch):
    rows = [f"{u}::{u * 7 % 13}::4::{1000 + u}" for u in range(100)]
    path = _write(tmp_path, "ratings.dat", "\n".join(rows) + "\n")
    whole = readers.read_movielens_dat(path)
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 50)
    for a, b in zip(whole, readers.read_movielens_dat(path)):
        np.testing.assert_array_equal(a, b)
    rows[76] = "76::x7::4::1076"
    path.write_text("\n".join(rows) + "\n")
    message = _error(readers.read_movielens_dat, path)
    assert "line 77" in message and "column 2 (MovieID)" in message and "'x7'" in message


def test_recbole_tokens_map_by_first_appearance(tmp_path):
    text = "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu9\tb\t3\t5.5\nu2\ta\t4\t1\nu9\ta\t1\t2\n"
    _check(readers.read_recbole(_write(tmp_path, "x.inter", text)), [0, 1, 0], [0, 1, 1], [5.5, 1, 2])


def test_csv_custom_columns_quotes_and_blank_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_CSV_CHUNK_ROWS", 2)
    text = 'ts;who;what\n10;"a;b";x\n\n5;c;y\n7;"a;b";y\n'
    events = readers.read_csv(_write(tmp_path, "e.csv", text), sep=";", user_col="who", item_col="what", time_col="ts")
    _check(events, [0, 1, 0], [0, 1, 1], [10, 5, 7])


def test_csv_without_time_column_keeps_file_order(tmp_path):
    path = _write(tmp_path, "e.csv", "user_id,item_id\nx,4\nx,5\n")
    _check(readers.read_csv(path, time_col=""), [0, 0], [4, 5], [0, 1])


def test_integer_tokens_keep_their_values_unless_not_plain(tmp_path):
    path = _write(tmp_path, "e.csv", "user_id,item_id,timestamp\n30,7,1\n4,0,2\n")
    _check(readers.read_csv(path), [30, 4], [7, 0], [1, 2])
    path = _write(tmp_path, "e.csv", "user_id,item_id,timestamp\n30,7,1\n4,007,2\n")
    _check(readers.read_csv(path), [30, 4], [0, 1], [1, 2])


def test_read_events_dispatches(tmp_path):
    path = _write(tmp_path, "u.data", "1\t2\t3\t4\n")
    _check(readers.read_events(path, "movielens-100k"), [1], [2], [4])
    assert "unknown data format" in _error(readers.read_events, path, "parquet")


@pytest.mark.parametrize("fn", [readers.read_movielens_dat, readers.read_movielens_csv, readers.read_recbole, readers.read_csv])
def test_missing_file(tmp_path, fn):
    message = _error(fn, tmp_path / "nope.txt")
    assert "nope.txt not found" in message


def test_missing_columns_name_the_columns_found(tmp_path):
    path = _write(tmp_path, "ratings.csv", "userId,itemId,rating,timestamp\n1,2,3,4\n")
    message = _error(readers.read_movielens_csv, path)
    assert "no column 'movieId'" in message and "'itemId'" in message
    path = _write(tmp_path, "e.csv", "user,item_id,timestamp\n1,2,3\n")
    message = _error(readers.read_csv, path)
    assert "no column 'user_id'" in message and "'user'" in message
    path = _write(tmp_path, "e.inter", "user_id:token\titem_id:token\n1\t2\n")
    assert "no column 'timestamp'" in _error(readers.read_recbole, path)


def test_non_integer_id(tmp_path):
    path = _write(tmp_path, "u.data", "1\t2\t3\t4\n1\t2.5\t3\t4\n")
    message = _error(readers.read_movielens_100k, path)
    assert "u.data line 2, column 2 (item id)" in message and "'2.5' is not an integer id" in message


def test_non_numeric_timestamp(tmp_path):
    path = _write(tmp_path, "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,3,4\n1,3,4,yesterday\n")
    message = _error(readers.read_movielens_csv, path)
    assert "line 4, column 4 (timestamp)" in message and "'yesterday' is not a numeric timestamp" in message
    path = _write(tmp_path, "e.csv", "user_id,item_id,timestamp\na,b,1\na,c,noon\n")
    message = _error(readers.read_csv, path)
    assert "e.csv line 3, column 'timestamp'" in message and "'noon'" in message


def test_wrong_field_counts(tmp_path):
    path = _write(tmp_path, "ratings.dat", "1::2::3::4\n1::2::3\n")
    assert "line 2: expected 4 fields" in _error(readers.read_movielens_dat, path)
    path = _write(tmp_path, "e.csv", "user_id,item_id,timestamp\na,b,1\na,c\n")
    assert "line 3: expected at least 3 fields" in _error(readers.read_csv, path)


def test_empty_token_id(tmp_path):
    path = _write(tmp_path, "e.csv", "user_id,item_id,timestamp\na,,1\n")
    assert "line 2: empty 'item_id'" in _error(readers.read_csv, path)


def test_token_readers_return_the_item_tokens_by_code(tmp_path):
    path = _write(tmp_path, "e.csv", 'user_id,item_id,timestamp\nx,b,1\ny,"a,1",2\nx,b,3\nx,007,4\n')
    (u, i, t), tokens = readers.read_events_with_tokens(path, "csv")
    _check((u, i, t), [0, 1, 0, 0], [0, 1, 0, 2], [1, 2, 3, 4])
    assert tokens == ["b", "a,1", "007"]  # tokens[code]: the file's text, first appearance first
    text = "user_id:token\titem_id:token\ttimestamp:float\nu\t12\t1\nv\t3\t2\n"
    (_, i, _), tokens = readers.read_events_with_tokens(_write(tmp_path, "x.inter", text), "recbole")
    assert tokens is None and i.tolist() == [12, 3]  # plain integers keep their values, no tokens
    (_, i, _), tokens = readers.read_events_with_tokens(_write(tmp_path, "u.data", "1\t2\t3\t4\n"), "movielens-100k")
    assert tokens is None and i.tolist() == [2]
