"""Prepared-data cache: one directory of `.npy` files plus `meta.json` per (source, config).

A cache directory appears only complete: it is written under a temporary name and renamed
into place, so an interrupted prepare leaves at most a hidden `.tmp-*` directory behind; the
next save removes those whose process is gone and which are over an hour old.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import time
import uuid
from collections.abc import Mapping

import numpy as np

from cprec.errors import DataError

# Part of every cache key: a cache written in another format is never found, so it is prepared
# again. 2: the item tokens of token-coded files (item_token_data/offsets) and meta's `item_ids`.
CACHE_VERSION = 2
META_FILE = "meta.json"
# On a shared file system a pid that is dead here may be another host's live prepare: only temporary
# directories this old (by mtime) are removed.
STALE_TMP_SECONDS = 3600
_TMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]{8}$")


def cache_key(fields: Mapping) -> str:
    """Short stable hash of json-able `fields` (plus the cache format version)."""
    blob = json.dumps({"version": CACHE_VERSION, **fields}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_identity(path: str | pathlib.Path) -> dict:
    """What identifies a source file's content cheaply: resolved path, size, mtime."""
    st = pathlib.Path(path).stat()
    return {"path": str(pathlib.Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_path(root: str | pathlib.Path, name: str, key: str) -> pathlib.Path:
    return pathlib.Path(root) / f"{name}-{key}"


def is_complete(directory: pathlib.Path) -> bool:
    return (directory / META_FILE).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_tmp(root: pathlib.Path, max_age_s: float = STALE_TMP_SECONDS) -> list[pathlib.Path]:
    """Removes the temporary directories of interrupted saves under `root`; returns them."""
    removed = []
    now = time.time()
    for path in root.iterdir() if root.is_dir() else ():
        match = _TMP_NAME.match(path.name)
        if not match or not path.is_dir() or _pid_alive(int(match.group(1))):
            continue
        try:
            if now - path.stat().st_mtime > max_age_s:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        except OSError:
            continue  # removed meanwhile
    return removed


def save(directory: pathlib.Path, arrays: Mapping[str, np.ndarray], meta: Mapping) -> pathlib.Path:
    """Writes `arrays` and `meta` atomically into `directory`; returns it.

    If another process finished the same directory first, its copy is kept.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(directory.parent)
    tmp = directory.parent / f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array))
        full_meta = {**meta, "cache_version": CACHE_VERSION, "arrays": sorted(arrays)}
        (tmp / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        try:
            tmp.rename(directory)
        except OSError:
            if not is_complete(directory):
                raise
    except OSError as e:
        raise DataError(f"cannot write the data cache {directory} ({_brief(e)}); check free space and permissions") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load(directory: pathlib.Path) -> tuple[dict[str, np.ndarray], dict]:
    """Memory-maps every array of a cache directory; returns (arrays, meta)."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
    except (OSError, ValueError, KeyError) as e:
        raise DataError(
            f"data cache {directory} is unreadable ({type(e).__name__}: {_brief(e)}); delete that directory and run again"
        ) from None
    return arrays, meta


def _brief(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
