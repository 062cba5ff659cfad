"""MovieLens archives from GroupLens: resumable, sha256-checked, extracted into `<raw>/<name>/`.

A download goes to `<archive>.zip.part` and continues from its size with an HTTP Range
request; the file is renamed to `<archive>.zip` only once its checksum matches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Callable
from typing import Any

from cprec.errors import DataError

Opener = Callable[..., Any]
"""`urllib.request.urlopen`-like: (Request, timeout=...) -> response with read(), status, headers."""

_BASE = "https://files.grouplens.org/datasets/movielens"
_TIMEOUT_S = 60


@dataclasses.dataclass(frozen=True)
class Archive:
    url: str
    sha256: str | None  # None: not known, the download is unchecked (a warning says so)
    size: int | None
    data_file: str  # the ratings file the archive provides


# sha256 and sizes as recorded in tensorflow_datasets' url_checksums/movielens.txt.
# 'ml-latest' is the small ml-latest archive; GroupLens updates it rarely, so a mismatch may
# mean a new release rather than a corrupt download.
ARCHIVES: dict[str, Archive] = {
    "ml-100k": Archive(
        f"{_BASE}/ml-100k.zip",
        "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        4924029,
        "u.data",
    ),
    "ml-1m": Archive(
        f"{_BASE}/ml-1m.zip",
        "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        5917549,
        "ratings.dat",
    ),
    "ml-20m": Archive(
        f"{_BASE}/ml-20m.zip",
        "96f243c338a8665f6bcc89c53edf6ee39162a846940de6b7c8c48aeada765ff3",
        198702078,
        "ratings.csv",
    ),
    "ml-latest": Archive(
        f"{_BASE}/ml-latest-small.zip",
        "696d65a3dfceac7c45750ad32df2c259311949efec81f0f144fdfb91ebc9e436",
        978202,
        "ratings.csv",
    ),
}


def download(
    name: str,
    raw_root: str | pathlib.Path,
    *,
    opener: Opener | None = None,
    log: Callable[[str], None] | None = print,
) -> pathlib.Path:
    """Makes sure `<raw_root>/<name>/<data file>` exists; returns its path."""
    if name not in ARCHIVES:
        raise DataError(f"no download for dataset {name!r}; downloadable: {', '.join(ARCHIVES)}")
    archive = ARCHIVES[name]
    out_dir = pathlib.Path(raw_root) / name
    target = out_dir / archive.data_file
    if target.is_file():
        return target
    zip_path = out_dir / pathlib.PurePosixPath(urllib.parse.urlparse(archive.url).path).name
    fetch(archive.url, zip_path, archive.sha256, opener=opener, log=log)
    extract(zip_path, out_dir)
    if not target.is_file():
        raise DataError(f"{zip_path} has no {archive.data_file}; delete it and run again")
    if log:
        log(f"extracted {zip_path.name} into {out_dir}")
    return target


def sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch(
    url: str,
    dest: pathlib.Path,
    sha256: str | None,
    *,
    opener: Opener | None = None,
    log: Callable[[str], None] | None = print,
) -> pathlib.Path:
    """Downloads `url` to `dest`, resuming `dest.part`, and checks its sha256."""
    dest = pathlib.Path(dest)
    if dest.is_file() and (sha256 is None or sha256_file(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    start = time.perf_counter()
    if log:
        log(f"downloading {url} -> {dest}" + (f" (resuming at {have:,} bytes)" if have else ""))
    _transfer(url, part, have, opener or urllib.request.urlopen, dest.parent)
    if sha256 is None:
        if log:
            log(f"warning: no known sha256 for {url}; the download is unchecked")
    else:
        digest = sha256_file(part)
        if digest != sha256:
            part.unlink()
            raise DataError(
                f"sha256 mismatch for {url} (expected {sha256}, got {digest}); the download was "
                f"deleted: run again, or if GroupLens changed the archive update cprec/data/download.py"
            )
    part.replace(dest)
    if log:
        log(f"downloaded {dest.name} ({dest.stat().st_size:,} bytes, {time.perf_counter() - start:.1f}s)")
    return dest


def _transfer(url: str, part: pathlib.Path, have: int, opener: Opener, where: pathlib.Path) -> None:
    """Appends the rest of `url` to `part` (or rewrites it if the server ignores Range)."""
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    hint = f"check the network, or download {url} by hand into {where}"
    try:
        response = opener(request, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the .part is already complete
            return
        raise DataError(f"cannot download {url} (HTTP {e.code} {e.reason}); {hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot download {url} ({reason}); {hint}") from None
    with response:
        status = getattr(response, "status", None) or response.getcode()
        content_range = (response.headers.get("Content-Range") or "") if response.headers else ""
        resumed = have and status == 206 and content_range.startswith(f"bytes {have}-")
        try:
            with open(part, "ab" if resumed else "wb") as f:
                shutil.copyfileobj(response, f, 1 << 20)
        except OSError as e:
            raise DataError(f"download of {url} interrupted ({e}); run again to resume") from None


def extract(zip_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Extracts `zip_path` into `out_dir`, dropping the archive's single top-level folder."""
    out_dir = pathlib.Path(out_dir)
    tmp = out_dir / f".extract-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            tops = {pathlib.PurePosixPath(i.filename).parts[0] for i in infos}
            strip = len(tops) == 1 and all(len(pathlib.PurePosixPath(i.filename).parts) > 1 for i in infos)
            for info in infos:
                parts = pathlib.PurePosixPath(info.filename).parts[1 if strip else 0 :]
                if info.filename.startswith("/") or ".." in parts:
                    raise DataError(f"{zip_path} holds an unsafe path {info.filename!r}; delete the archive")
                target = tmp.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
            final = out_dir / path.relative_to(tmp)
            final.parent.mkdir(parents=True, exist_ok=True)
            path.replace(final)
    except zipfile.BadZipFile:
        raise DataError(f"{zip_path} is not a valid zip archive; delete it and run again") from None
    except OSError as e:
        raise DataError(f"cannot extract {zip_path} ({e}); check free space and permissions") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
