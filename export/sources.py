"""Where weights come from: telling a hub id from a path, and hashing a weights file (stdlib only)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(text: str) -> bool:
    """"owner/name" (and not "./x" or a deeper path): what diffusers would look up on the hub."""
    return bool(_HUB_ID.match(text)) and not text.startswith(".")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
