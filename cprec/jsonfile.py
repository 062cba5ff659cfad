"""JSON files written whole: a reader, or a crash, never sees half a file."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def write_json(path: str | pathlib.Path, data: Any, sort_keys: bool = False) -> pathlib.Path:
    """Writes `data` to `path` (parents created) through a temporary file and an atomic rename."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, sort_keys=sort_keys) + "\n")
    tmp.replace(path)
    return path
