"""Contact sheets: one PNG per expanded prompt, DIR/contact/<prompt_id>.png, its images as tiles
labelled with their seed (and, best-of-N, their score below it), the prompt on top; so a person
picks the good seeds at a glance and lists them for ``--keep``. DIR/contact/index.tsv maps prompt ids to prompts.

Needs Pillow (not in the plain install); without it the job warns and writes none.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .plan import PlannedImage
from .store import write_atomic

Done = tuple[PlannedImage, dict[str, Any]]  # a written image and its metadata row

_TILE_MIN = 64  # pixels: tiles are never upscaled past this (the PNG encode of a sheet costs ~0.1 s/MP)
_TILE_MAX = 256  # pixels: sheets of 512x512 images stay small
_LINE_H = 12  # pixels per line of text (the prompt header, the seed labels)
_COLUMNS_MAX = 8
_CHAR_W = 6  # pixels per character of Pillow's default bitmap font


def _import_pil() -> Any:
    try:
        from PIL import Image, ImageDraw
    except ImportError as exc:
        raise ImportError("contact sheets need Pillow, which lcmserve does not install: "
                          "pip install pillow") from exc
    return Image, ImageDraw


class ContactSheets:
    """Writes each expanded prompt's sheet in a worker thread as soon as its last image of this
    run is written (Pillow's encoders release the GIL), so sheets overlap generation.

    Raises ImportError at construction when Pillow is missing.
    """

    def __init__(self, out: Path, todo: Iterable[PlannedImage]) -> None:
        self._modules = _import_pil()
        self.out = out
        self.folder = out / "contact"
        self._pending: dict[str, int] = {}  # prompt id -> images of this run not yet finished
        for image in todo:
            self._pending[image.prompt_id] = self._pending.get(image.prompt_id, 0) + 1
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contact-sheets")
        self._futures: list[Future[None]] = []

    def finished(self, prompt_id: str, done: Callable[[], list[Done]]) -> None:
        """One image of ``prompt_id`` was written or failed; ``done()`` lists its done images."""
        self._pending[prompt_id] -= 1
        if self._pending[prompt_id] == 0:
            self._submit(prompt_id, done())

    def _submit(self, prompt_id: str, images: list[Done]) -> None:
        if images:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{prompt_id}.png"
            self._futures.append(self._pool.submit(self._write, path, images))

    def _write(self, path: Path, images: list[Done]) -> None:
        image_mod, draw_mod = self._modules
        write_atomic(path, _sheet(self.out, [i for i, _ in images], image_mod, draw_mod, [row for _, row in images]))

    def close(self, done: Iterable[Done]) -> int:
        """Writes the sheets still missing (of prompts without work this run), waits for all, writes
        contact/index.tsv; returns how many sheets this run wrote."""
        groups: dict[str, list[Done]] = {}
        for image, row in done:
            groups.setdefault(image.prompt_id, []).append((image, row))
        for prompt_id, images in groups.items():
            if prompt_id not in self._pending and not (self.folder / f"{prompt_id}.png").exists():
                self._submit(prompt_id, images)
        try:
            for future in self._futures:
                future.result()
        finally:
            self._pool.shutdown(wait=True)
        if groups:
            firsts = {pid: images[0][0] for pid, images in groups.items()}
            index = "".join(f"{pid}\t{i.prompt}\t{i.init_image.name if i.init_image else ''}\n" for pid, i in firsts.items())
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.folder / "index.tsv", index.encode("utf-8"))
        return len(self._futures)


def _labels(row: dict[str, Any]) -> list[str]:
    """The lines under a tile: the seed, and the score when the row has one (best-of-N)."""
    score = row.get("score")
    return [str(row["seed"])] + ([f"score {score:.2f}"] if isinstance(score, (int, float)) else [])


def _sheet(out: Path, images: list[PlannedImage], image_mod: Any, draw_mod: Any,
           metadata: list[dict[str, Any]] | None = None) -> bytes:
    """PNG bytes of one sheet: a grid of tiles (seed, and score, under each: from each image's
    metadata row, else its planned seed), the prompt wrapped on top."""
    labels = [_labels(row) for row in metadata] if metadata is not None else [[str(i.seed)] for i in images]
    with image_mod.open(out / images[0].split / images[0].file_name) as first:
        width, height = first.size
    scale = min(max(_TILE_MIN / width, 1.0), _TILE_MAX / max(width, height))
    # A tile is as wide as its longest seed label (19 digits: wider than a 64-pixel image): a seed
    # is read and copied whole, never wrapped.
    probe = draw_mod.Draw(image_mod.new("RGB", (1, 1)))
    label_w = max(math.ceil(probe.textlength(line)) for lines in labels for line in lines)
    tile_w, tile_h = max(_TILE_MIN, round(width * scale), label_w + 4), round(height * scale)
    label_h = _LINE_H * max(len(lines) for lines in labels) + 2
    columns = min(_COLUMNS_MAX, math.ceil(math.sqrt(len(images))))
    rows = math.ceil(len(images) / columns)
    sheet_w = columns * tile_w
    header = textwrap.wrap(images[0].prompt, max(10, sheet_w // _CHAR_W)) or [""]
    top = len(header) * _LINE_H + 4
    sheet = image_mod.new("RGB", (sheet_w, top + rows * (tile_h + label_h)), "white")
    draw = draw_mod.Draw(sheet)
    for i, line in enumerate(header):
        draw.text((2, 2 + i * _LINE_H), line, fill="black")
    for n, planned in enumerate(images):
        x, y = (n % columns) * tile_w, top + (n // columns) * (tile_h + label_h)
        with image_mod.open(out / planned.split / planned.file_name) as picture:
            tile = picture.convert("RGB").resize((round(width * scale), tile_h))
        sheet.paste(tile, (x + (tile_w - tile.width) // 2, y))
        for i, line in enumerate(labels[n]):
            draw.text((x + 2, y + tile_h + 1 + i * _LINE_H), line, fill="black")
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", compress_level=1)  # fast zlib: sheets are looked at, not archived
    return buffer.getvalue()
