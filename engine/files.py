"""Files that appear whole or not at all.

Every file the tool writes for later reading (baseline caches, the demo's corpus and manifest,
exports) goes through `write_text_atomic`: the text goes to a temporary file with a unique name
in the same folder, which is then renamed over the target. Readers see the old file or the new
one, never half of one; and two processes writing the same path at once (two workers on one host
that miss the same cache entry) never trip over each other's temporary file.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: Path | str, text: str) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: Path | str, obj, indent: int | None = None) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=indent))
