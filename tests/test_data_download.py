"""Downloader on locally built archives: extraction, checksum, mismatch, resume (no network)."""

import hashlib
import importlib.util
import io
import urllib.error
import zipfile

import pytest

from cprec.data import dataset, download
from cprec.errors import DataError

RATINGS = b"".join(b"%d::%d::4::%d\n" % (u, i, 1000 * u + i) for u in range(1, 40) for i in range(1, 30))


def _zip(tmp_path, members=None):
    members = members or {"ml-1m/ratings.dat": RATINGS, "ml-1m/README": b"readme", "ml-1m/": None}
    path = tmp_path / "src" / "ml-1m.zip"
    path.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            if data is None:
                zf.writestr(zipfile.ZipInfo(name), b"")
            else:
                zf.writestr(name, data)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _use(monkeypatch, zip_path, sha256):
    archive = download.Archive(zip_path.as_uri(), sha256, zip_path.stat().st_size, "ratings.dat")
    monkeypatch.setitem(download.ARCHIVES, "ml-1m", archive)


class _RangeServer:
    """An opener that serves a local file and honours `Range: bytes=N-` with a 206."""

    def __init__(self, data: bytes):
        self.data, self.ranges = data, []

    def __call__(self, request, timeout=None):
        rng = request.get_header("Range")
        self.ranges.append(rng)
        start = int(rng.split("=")[1].rstrip("-")) if rng else 0
        if start >= len(self.data):
            raise urllib.error.HTTPError(request.full_url, 416, "Range Not Satisfiable", {}, None)
        response = io.BytesIO(self.data[start:])
        response.status = 206 if rng else 200
        response.headers = {"Content-Range": f"bytes {start}-{len(self.data) - 1}/{len(self.data)}"} if rng else {}
        return response


def test_download_extracts_into_raw_dir(tmp_path, monkeypatch):
    zip_path, sha = _zip(tmp_path)
    _use(monkeypatch, zip_path, sha)
    target = download.download("ml-1m", tmp_path / "raw", log=None)
    assert target == tmp_path / "raw" / "ml-1m" / "ratings.dat"
    assert target.read_bytes() == RATINGS and (target.parent / "README").read_bytes() == b"readme"
    assert (target.parent / "ml-1m.zip").is_file() and not (target.parent / "ml-1m.zip.part").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == ["README", "ml-1m.zip", "ratings.dat"]
    zip_path.unlink()  # a second call finds the file and touches no network
    assert download.download("ml-1m", tmp_path / "raw", log=None) == target


def test_checksum_mismatch_deletes_download(tmp_path, monkeypatch):
    zip_path, _ = _zip(tmp_path)
    _use(monkeypatch, zip_path, "0" * 64)
    with pytest.raises(DataError) as info:
        download.download("ml-1m", tmp_path / "raw", log=None)
    message = str(info.value)
    assert "sha256 mismatch" in message and "0" * 64 in message and "\n" not in message
    assert list((tmp_path / "raw" / "ml-1m").iterdir()) == []


def test_resume_appends_to_part_file(tmp_path):
    zip_path, sha = _zip(tmp_path)
    data = zip_path.read_bytes()
    dest = tmp_path / "out" / "ml-1m.zip"
    dest.parent.mkdir()
    dest.with_name("ml-1m.zip.part").write_bytes(data[:100])
    server = _RangeServer(data)
    download.fetch("https://example.invalid/ml-1m.zip", dest, sha, opener=server, log=None)
    assert server.ranges == ["bytes=100-"] and dest.read_bytes() == data


def test_complete_part_file_answered_416(tmp_path):
    zip_path, sha = _zip(tmp_path)
    dest = tmp_path / "ml-1m.zip"
    dest.with_name("ml-1m.zip.part").write_bytes(zip_path.read_bytes())
    download.fetch("https://example.invalid/ml-1m.zip", dest, sha, opener=_RangeServer(zip_path.read_bytes()), log=None)
    assert dest.read_bytes() == zip_path.read_bytes()


def test_server_ignoring_range_restarts(tmp_path):
    zip_path, sha = _zip(tmp_path)
    dest = tmp_path / "ml-1m.zip"
    dest.with_name("ml-1m.zip.part").write_bytes(b"stale bytes from another file")
    download.fetch(zip_path.as_uri(), dest, sha, log=None)  # file:// answers without a 206
    assert dest.read_bytes() == zip_path.read_bytes()


def test_unknown_checksum_warns(tmp_path, capsys):
    zip_path, _ = _zip(tmp_path)
    download.fetch(zip_path.as_uri(), tmp_path / "x.zip", None)
    assert "warning: no known sha256" in capsys.readouterr().out


def test_network_error_is_one_line(tmp_path):
    def offline(request, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    with pytest.raises(DataError) as info:
        download.fetch("https://files.example/ml-1m.zip", tmp_path / "ml-1m.zip", None, opener=offline, log=None)
    assert "cannot download https://files.example/ml-1m.zip (Name or service not known)" in str(info.value)


def test_bad_and_unsafe_archives(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a valid zip archive"):
        download.extract(bad, tmp_path / "out")
    evil, _ = _zip(tmp_path, {"ml-1m/../../evil.txt": b"x", "ml-1m/ratings.dat": b"1::2::3::4\n"})
    with pytest.raises(DataError, match="unsafe path"):
        download.extract(evil, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "out" / "ratings.dat").exists()


def test_extract_without_top_folder(tmp_path):
    flat, _ = _zip(tmp_path, {"ratings.csv": b"a", "links.csv": b"b"})
    download.extract(flat, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["links.csv", "ratings.csv"]


def test_known_archives_have_checksums():
    for name, archive in download.ARCHIVES.items():
        assert archive.url.startswith("https://files.grouplens.org/datasets/movielens/"), name
        assert archive.sha256 and len(archive.sha256) == 64, name


def test_prepare_cli_downloads_then_prepares(tmp_path, monkeypatch, capsys):
    zip_path, sha = _zip(tmp_path)
    _use(monkeypatch, zip_path, sha)
    spec = importlib.util.spec_from_file_location("prepare_cli", dataset.REPO_ROOT / "data" / "prepare.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["ml-1m", "--raw-dir", str(tmp_path / "raw"), "--cache-dir", str(tmp_path / "cache")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "downloading" in out and "ml-1m: 39 users, 29 items" in out
    assert (tmp_path / "raw" / "ml-1m" / "ratings.dat").is_file()
