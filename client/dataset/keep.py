"""``--keep FILE``: a filtered copy of a dataset folder, with the images a person picked.

FILE lists file names (``3f2a9c01b7de-0004.png``) or seeds, one a line, blank lines and ``#``
comments ignored. The copy has the same layout: the kept images (and masks), each split's
metadata.jsonl with their lines in the original order, and dataset.json with ``kept_from`` and
``keep`` added. Nothing is generated; no server is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from .spec import DatasetError
from .store import MANIFEST, METADATA, write_atomic, write_manifest


def read_keep_list(path: Path) -> list[str]:
    """The names and seeds in a keep file (comments and blank lines dropped)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DatasetError(f"--keep {path}: cannot read it: {exc.strerror or exc}") from exc
    entries = [line.split("#", 1)[0].strip() for line in lines]
    return [entry for entry in entries if entry]


def keep(source: str | Path, keep_file: str | Path, dest: str | Path) -> dict[str, int]:
    """Copies the images of ``source`` named in ``keep_file`` to ``dest`` (which must not exist,
    or be empty); returns the kept count per split. Raises DatasetError naming entries of the
    keep file that match no image."""
    source, dest = Path(source), Path(dest)
    wanted = read_keep_list(Path(keep_file))
    if not wanted:
        raise DatasetError(f"--keep {keep_file}: no file names or seeds in it")
    if dest.exists() and any(dest.iterdir()):
        raise DatasetError(f"{dest}: exists and is not empty; give a new folder for the kept copy")
    try:
        manifest: dict[str, Any] = json.loads((source / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{source}: no readable {MANIFEST}: is it a dataset folder?") from exc
    picked: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # split -> (line, row), in order
    matched: set[str] = set()
    for metadata in sorted(source.glob(f"*/{METADATA}")):
        for line in metadata.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            hits = {str(row.get("file_name")), str(row.get("seed"))}.intersection(wanted)
            if hits:
                matched.update(hits)
                picked.setdefault(metadata.parent.name, []).append((line, row))
    unknown = [entry for entry in wanted if entry not in matched]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise DatasetError(f"--keep {keep_file}: no image of {source} has the file name or seed {shown}")
    counts: dict[str, int] = {}
    for split, entries in picked.items():
        folder = dest / split
        folder.mkdir(parents=True, exist_ok=True)
        for _, row in entries:
            for name in (row.get("file_name"), row.get("mask_file_name")):
                if name:
                    shutil.copyfile(source / split / name, folder / name)
        write_atomic(folder / METADATA, "".join(line + "\n" for line, _ in entries).encode("utf-8"))
        counts[split] = len(entries)
    manifest.pop("format", None)
    manifest.update({"counts": counts, "images": sum(counts.values()), "complete": True,
                     "kept_from": str(source.resolve()), "keep": wanted})
    write_manifest(dest, manifest)
    return counts
