"""The output folder: the imagefolder layout, its metadata lines, resuming, dataset.json.

    DIR/<split>/<prompt_id>-<k>.<ext>           the images (and <stem>_mask.png, inpainting labels)
    DIR/<split>/metadata.jsonl                   one JSON line per image, every column in every line
    DIR/dataset.json                             spec, model, counts, wall time of the last run
    DIR/contact/<prompt_id>.png                  contact sheets (contact.py)
    DIR/rejected.jsonl                           best-of-N with on_fail: skip: the images left out
                                                 (below min_score after max_rounds), so a rerun
                                                 does not try them again

Crash safety without fsync (a killed process loses nothing the kernel already has; a power cut
may): an image goes to ``.<name>.part`` and is renamed; its metadata line is appended after the
rename with one write() on an O_APPEND descriptor, so a line is there whole or not at all. On
start, a line counts as done only if it is exactly the line this spec gives for that file and the
file's sha256 matches; everything else (half-written parts, files without a line, lines of an
older spec) is removed and made again. At the end the metadata files are rewritten in plan order,
so a finished folder is byte-identical however often it was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .plan import Plan, PlannedImage
from .spec import DatasetError, DatasetSpec

METADATA = "metadata.jsonl"
MANIFEST = "dataset.json"
REJECTED = "rejected.jsonl"
MANIFEST_FORMAT = "lcmserve-dataset/1"
_OURS = re.compile(r"[0-9a-f]{12}-\d{4,}(_mask)?\.[a-z]+\Z")  # names this job writes
_MODEL_IDENTITY = ("base", "loras", "dtype", "backend")  # what must match to resume a folder


@dataclass(frozen=True)
class Outcome:
    """What best-of-N picked for an image (the metadata columns that depend on the server)."""

    seed: int  # the winning candidate's seed: it alone (candidates 1) reproduces the image
    score: float | None  # its score; None from a server without a scorer
    rounds: int  # rounds sent, 1 to max_rounds
    passed: bool | None  # score >= min_score; None without min_score

    @staticmethod
    def from_row(row: dict[str, Any]) -> Outcome | None:
        """The outcome a metadata line records, or None when its columns are malformed."""
        seed, score, rounds, passed = (row.get(k) for k in ("seed", "score", "rounds", "passed"))
        if isinstance(seed, bool) or not isinstance(seed, int) or isinstance(rounds, bool) \
                or not isinstance(rounds, int) or not (passed is None or isinstance(passed, bool)) \
                or not (score is None or (isinstance(score, (int, float)) and not isinstance(score, bool))):
            return None
        return Outcome(seed, None if score is None else float(score), rounds, passed)

    def fits(self, spec: DatasetSpec, image: PlannedImage) -> bool:
        """The outcome is one this spec can give for this image (its seed is one of its candidates)."""
        k = spec.per_image
        return 1 <= self.rounds <= spec.max_rounds and image.seed <= self.seed < image.seed + k * self.rounds


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metadata_row(spec: DatasetSpec, plan: Plan, image: PlannedImage, sha256: str,
                 mask_sha256: str | None = None, init_sha256: str | None = None,
                 outcome: Outcome | None = None) -> dict[str, Any]:
    """The metadata line of ``image``, columns in a fixed order. Every line of a dataset has the
    same columns (``datasets`` refuses splits whose columns differ): a variable that an image's
    template lacks is "". Init image columns only with init_images, mask columns only with masks,
    adapters only when the spec names adapters, score/candidates/rounds/passed only with best-of-N.
    """
    values = dict(image.variables)
    row: dict[str, Any] = {
        "file_name": image.file_name,
        "prompt": image.prompt,
        "negative_prompt": image.negative_prompt,
        "seed": outcome.seed if outcome is not None else image.seed,
        "num_inference_steps": spec.num_inference_steps,
        "guidance_scale": spec.guidance_scale,
        "width": image.width,
        "height": image.height,
        "format": spec.format,
        "template": image.template,
        "prompt_id": image.prompt_id,
        "image_index": image.image_index,
    }
    for name in plan.variable_names:
        row[name] = values.get(name, "")
    if spec.uses_adapters:
        row["adapters"] = image.adapters_label
    if spec.init_images is not None:
        assert image.init_image is not None
        row["init_image"] = image.init_image.name  # inside the spec's init_images folder
        row["init_sha256"] = init_sha256 if init_sha256 is not None else sha256_file(image.init_image)
        row["strength"] = spec.strength
    if spec.masks is not None:
        row["mask_file_name"] = image.mask_file_name  # `datasets` loads it as the "mask" image
        row["mask_sha256"] = mask_sha256
    if spec.best_of_n:
        row["score"] = outcome.score if outcome is not None else None
        row["candidates"] = spec.per_image
        row["rounds"] = outcome.rounds if outcome is not None else 1
        row["passed"] = outcome.passed if outcome is not None else None
    row["sha256"] = sha256
    return row


def rejected_row(spec: DatasetSpec, image: PlannedImage, outcome: Outcome) -> dict[str, Any]:
    """The rejected.jsonl line of an image left out (on_fail: skip): its best candidate."""
    return {"file_name": image.file_name, "split": image.split, "prompt": image.prompt, "seed": outcome.seed,
            "score": outcome.score, "candidates": spec.per_image, "rounds": outcome.rounds, "passed": False}


def _line(row: dict[str, Any]) -> bytes:
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``.<name>.part`` next to ``path``, then renames it over ``path``."""
    part = path.with_name(f".{path.name}.part")
    part.write_bytes(data)
    os.replace(part, path)


class Store:
    """The output folder of one spec: what is done, writing new images, the final rewrite."""

    def __init__(self, out: Path, spec: DatasetSpec, plan: Plan) -> None:
        self.out = out
        self.spec = spec
        self.plan = plan
        self.done: dict[str, dict[str, Any]] = {}  # file name -> its metadata row
        self.rejected: dict[str, dict[str, Any]] = {}  # file name -> its rejected.jsonl row (on_fail: skip)
        self.removed = 0  # stale files deleted by scan()
        self.previous: dict[str, Any] = {}  # the folder's dataset.json before this run
        self._fds: dict[str, int] = {}  # split -> O_APPEND descriptor of its metadata.jsonl
        self._init_sha: dict[Path, str] = {}
        self._labels: dict[tuple[Path, int, int], bytes] = {}  # (mask, width, height) -> label PNG

    # ---- resuming ---------------------------------------------------------------------------

    def check_model(self, models: list[dict[str, Any]], shard: tuple[int, int] | None = None,
                    scorer: dict[str, Any] | None = None) -> None:
        """Refuses to add to a folder that a different model (base, LoRAs, dtype, backend), another
        shard, or (best-of-N) another scorer made. Keeps its dataset.json as ``previous``."""
        try:
            previous = json.loads((self.out / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise DatasetError(f"{self.out / MANIFEST}: unreadable ({exc}); remove it or use another --out")
        if not isinstance(previous, dict):
            raise DatasetError(f"{self.out / MANIFEST}: not a dataset manifest; remove it or use another --out")
        self.previous = previous
        was = previous.get("shard")
        was_shard = (was.get("index"), was.get("count")) if isinstance(was, dict) else None
        if was_shard != shard and (previous.get("images") or previous.get("rejected")):
            name = "the whole spec" if was_shard is None else f"shard {was_shard[0]}/{was_shard[1]}"
            asked = "the whole spec" if shard is None else f"shard {shard[0]}/{shard[1]}"
            raise DatasetError(f"{self.out} holds {name}; this run makes {asked}: use another --out")
        if self.spec.best_of_n and previous.get("images") and previous.get("scorer", scorer) != scorer:
            raise DatasetError(f"{self.out} was picked by another scorer ({previous.get('scorer')}); this server "
                               f"scores with {scorer}: use another --out, or remove the folder")
        before = [{k: m.get(k) for k in _MODEL_IDENTITY} for m in previous.get("models") or []]
        now = [{k: m.get(k) for k in _MODEL_IDENTITY} for m in models]
        for old in before[:1]:
            for new in now:
                if new != old:
                    raise DatasetError(
                        f"{self.out} was made by another model ({old}); this server serves {new}: "
                        "images would mix models. Use another --out, or remove the folder"
                    )

    def scan(self) -> None:
        """Finds the images already done; removes half-written and stale files; rewrites each
        metadata.jsonl with its valid lines only."""
        self.out.mkdir(parents=True, exist_ok=True)
        planned = self.plan.by_file_name()
        folders = {name for name, _ in self.spec.splits}
        folders.update(p.parent.name for p in self.out.glob(f"*/{METADATA}") if p.parent.name != "contact")
        for split in sorted(folders):
            folder = self.out / split
            valid: dict[str, dict[str, Any]] = {}
            for row in _read_rows(folder / METADATA):
                name = row.get("file_name")
                image = planned.get(name) if isinstance(name, str) else None
                if image is not None and image.split == split and self._is_done(image, row):
                    valid[image.file_name] = row
            keep = set(valid) | {row["mask_file_name"] for row in valid.values() if row.get("mask_file_name")}
            if folder.is_dir():
                for path in folder.iterdir():
                    stale = _OURS.match(path.name) and path.name not in keep
                    if (stale or (path.name.startswith(".") and path.name.endswith(".part"))) and path.is_file():
                        path.unlink()
                        self.removed += bool(stale)
            self.done.update(valid)
        for row in _read_rows(self.out / REJECTED):
            name = row.get("file_name")
            image = planned.get(name) if isinstance(name, str) else None
            outcome = Outcome.from_row(row)
            if image is not None and outcome is not None and outcome.fits(self.spec, image) \
                    and self.spec.on_fail == "skip" and outcome.rounds == self.spec.max_rounds \
                    and image.file_name not in self.done and row == rejected_row(self.spec, image, outcome):
                self.rejected[image.file_name] = row
        for part in self.out.glob("contact/.*.part"):  # a sheet cut by a crash
            part.unlink()
        self.rewrite_metadata()

    @property
    def settled(self) -> set[str]:
        """File names needing no more work: done, or rejected for good."""
        return set(self.done) | set(self.rejected)

    def _is_done(self, image: PlannedImage, row: dict[str, Any]) -> bool:
        folder = self.out / image.split
        sha = row.get("sha256")
        mask_sha = row.get("mask_sha256")
        outcome = Outcome.from_row(row) if self.spec.best_of_n else None
        if self.spec.best_of_n and (outcome is None or not outcome.fits(self.spec, image)):
            return False
        if not isinstance(sha, str) or row != self.row(image, sha, mask_sha if isinstance(mask_sha, str) else None,
                                                       outcome):
            return False  # another spec's line (steps, size, prompt... changed) or a broken one
        try:
            if sha256_file(folder / image.file_name) != sha:
                return False
            return image.mask_file_name is None or sha256_file(folder / image.mask_file_name) == mask_sha
        except OSError:
            return False

    def row(self, image: PlannedImage, sha256: str, mask_sha256: str | None = None,
            outcome: Outcome | None = None) -> dict[str, Any]:
        """metadata_row, with each init image's sha256 computed once."""
        init_sha = None
        if image.init_image is not None:
            init_sha = self._init_sha.get(image.init_image)
            if init_sha is None:
                init_sha = self._init_sha[image.init_image] = sha256_file(image.init_image)
        return metadata_row(self.spec, self.plan, image, sha256, mask_sha256, init_sha, outcome)

    # ---- writing ----------------------------------------------------------------------------

    def write(self, image: PlannedImage, data: bytes, outcome: Outcome | None = None) -> dict[str, Any]:
        """Writes one finished image (and its mask label), then appends its metadata line."""
        folder = self.out / image.split
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / image.file_name, data)
        mask_sha = None
        if image.mask is not None and image.mask_file_name is not None:
            label = self._label(image.mask, image.width, image.height)
            write_atomic(folder / image.mask_file_name, label)
            mask_sha = hashlib.sha256(label).hexdigest()
        row = self.row(image, hashlib.sha256(data).hexdigest(), mask_sha, outcome)
        self._append(image.split, folder / METADATA, row)
        self.done[image.file_name] = row
        return row

    def reject(self, image: PlannedImage, outcome: Outcome) -> None:
        """Records an image left out (on_fail: skip) in rejected.jsonl."""
        self.out.mkdir(parents=True, exist_ok=True)
        row = rejected_row(self.spec, image, outcome)
        self._append(REJECTED, self.out / REJECTED, row)
        self.rejected[image.file_name] = row

    def _append(self, key: str, path: Path, row: dict[str, Any]) -> None:
        fd = self._fds.get(key)
        if fd is None:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fds[key] = fd
        line = _line(row)
        if os.write(fd, line) != len(line):  # one write: the line is there whole or not at all
            raise OSError(f"short write to {path}")

    def _label(self, mask: Path, width: int, height: int) -> bytes:
        """The mask as the server used it for a (width, height) image, PNG, made once per size."""
        key = (mask, width, height)
        if key not in self._labels:
            from .images import mask_label  # Pillow: only for inpainting specs

            self._labels[key] = mask_label(mask, width, height)
        return self._labels[key]

    def close(self) -> None:
        """Closes the metadata files opened for appending."""
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def rewrite_metadata(self) -> None:
        """Rewrites every split's metadata.jsonl with the done rows in plan order (atomically)."""
        self.close()
        by_split: dict[str, list[bytes]] = {}
        for image in self.plan.images:
            row = self.done.get(image.file_name)
            if row is not None:
                by_split.setdefault(image.split, []).append(_line(row))
        for split in sorted(set(by_split) | {p.parent.name for p in self.out.glob(f"*/{METADATA}")}):
            lines = by_split.get(split, [])
            path = self.out / split / METADATA
            if lines:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, b"".join(lines))
            elif path.exists():
                path.unlink()
        rejected = [_line(self.rejected[i.file_name]) for i in self.plan.images if i.file_name in self.rejected]
        if rejected:
            write_atomic(self.out / REJECTED, b"".join(rejected))
        elif (self.out / REJECTED).exists():
            (self.out / REJECTED).unlink()

    def counts(self) -> dict[str, int]:
        """Done images per split, in the spec's split order."""
        counts = {name: 0 for name, _ in self.spec.splits}
        for image in self.plan.images:
            if image.file_name in self.done:
                counts[image.split] += 1
        return counts

    def done_images(self) -> Iterable[PlannedImage]:
        """The planned images that are done, in plan order."""
        return (image for image in self.plan.images if image.file_name in self.done)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a metadata file; lines that do not parse (cut by a crash) are skipped."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Writes DIR/dataset.json (atomically), keys in the order given."""
    data = (json.dumps({"format": MANIFEST_FORMAT, **manifest}, indent=2, ensure_ascii=False) + "\n")
    write_atomic(out / MANIFEST, data.encode("utf-8"))
