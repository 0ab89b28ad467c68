"""The plan of a dataset: every image the spec asks for, with its prompt, seed, split and file name.

Expansion order (stable; it is the order of metadata.jsonl and of ``--limit``): the spec's
prompt entries in order; for each, the cartesian product of its variables (the first variable
varies slowest, each variable's values in the order given); for each expanded prompt, every init
image in file-name order (one pass without init images); then images 0 to ``images - 1``.

Seeds (the formula docs/dataset.md gives):

    key         = JSON [spec seed, template, [[variable, value], ...], init image file name or null]
                  (compact separators, UTF-8)
    digest      = sha256(key)
    prompt_id   = digest.hex()[:12]                     names the expanded prompt (file names, contact/)
    prompt_seed = int(digest[:8], big-endian) >> 2      0 <= prompt_seed < 2**62
    seed of image k = prompt_seed + k

Variables used only in a prompt entry's adapters (an adapter or scale sweep) are left out of the
key of prompt_seed (not of prompt_id): the images of a sweep share their seeds, so they compare
the same noise under each adapter and scale, and land in the same split.

Best-of-N (``candidates: K``, ``max_rounds: R``): image k owns the K * R seeds from
``prompt_seed + k * K * R``; round r (0-based) sends the K seeds from ``seed + r * K``, and the
metadata's seed is the winning candidate's (it alone reproduces the image). The split is still
drawn from ``prompt_seed + k``. With K = R = 1 this is the formula above.

So an image's seed depends only on what it is, not on where its entry sits: appending, removing
or reordering entries leaves every other image's seed, split and file name unchanged. Consecutive
seeds let one request carry several images of an expanded prompt (image i of a request uses
seed + i, as the server defines).

Split of an image: u = int(sha256("split:<seed>")[:8], big-endian) / 2**64, uniform in [0, 1);
the first split whose running sum of fractions exceeds u. Deterministic per image, so fractions
hold only on average over many images.

Size of an image: the spec's width and height; one not given is 512, or with init images the init
image's side floored to a multiple of 8 (as the server and `lcmserve generate` do), so an
inpainting image and its mask label have one size.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from ..types import FORMAT_SUFFIXES
from .spec import IMAGE_SUFFIXES, DatasetError, DatasetSpec, PromptSpec, check_scale

DEFAULT_SIDE = 512  # pixels: the server's default width and height (without an init image)


@dataclass(frozen=True)
class PlannedImage:
    """One image of the dataset, before or after it is made."""

    order: int  # position in expansion order, 0-based
    prompt_id: str  # 12 hex digits naming the expanded prompt
    prompt: str
    negative_prompt: str
    template: str
    variables: tuple[tuple[str, str], ...]  # (name, value) of the template's variables
    image_index: int  # k: 0 to images - 1 within its expanded prompt (and init image)
    seed: int  # prompt_seed + k
    split: str
    file_name: str  # "<prompt_id>-<k:04d>.<ext>", inside DIR/<split>/
    init_image: Path | None  # img2img/inpainting source, absolute
    mask: Path | None  # inpainting mask, absolute
    width: int = DEFAULT_SIDE  # pixels, sent in the request (see the module's docstring)
    height: int = DEFAULT_SIDE
    adapters: tuple[tuple[str, float], ...] = ()  # (name, scale) sent with the request, resolved

    @property
    def adapters_label(self) -> str:
        """The adapters metadata column: "name:scale,..." as `lcmserve generate --adapter` takes them."""
        return ",".join(f"{name}:{scale:g}" for name, scale in self.adapters)

    @property
    def mask_file_name(self) -> str | None:
        """Name of the mask label next to the image (the mask as the server used it, PNG), or None."""
        if self.mask is None:
            return None
        return f"{Path(self.file_name).stem}_mask.png"


@dataclass(frozen=True)
class Plan:
    """Every image of a spec in expansion order, and the variable names across its templates."""

    images: tuple[PlannedImage, ...]
    variable_names: tuple[str, ...]  # every template's variables, in order of first appearance

    def by_file_name(self) -> dict[str, PlannedImage]:
        """Planned images by file name (unique across splits)."""
        return {image.file_name: image for image in self.images}

    def subset(self, images: tuple[PlannedImage, ...]) -> Plan:
        """The same plan restricted to ``images`` (a shard): same columns, same order."""
        return Plan(images, self.variable_names)


def prompt_key_digest(seed: int, template: str, variables: tuple[tuple[str, str], ...],
                      init_name: str | None) -> bytes:
    """sha256 of the identity of an expanded prompt (see the module's docstring)."""
    key = json.dumps([seed, template, [list(v) for v in variables], init_name],
                     ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(key.encode("utf-8")).digest()


def split_of(seed: int, splits: tuple[tuple[str, float], ...]) -> str:
    """The split of the image with ``seed`` (see the module's docstring)."""
    digest = hashlib.sha256(f"split:{seed}".encode("ascii")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
    running = 0.0
    for name, fraction in splits:
        running += fraction
        if u < running:
            return name
    return next(name for name, fraction in reversed(splits) if fraction > 0)  # rounding at the top


def init_pairs(spec: DatasetSpec) -> list[tuple[Path | None, Path | None]]:
    """(init image, mask) pairs: one (None, None) without init_images; else every image file of
    the folder in name order, each with the mask of the same stem when masks is set."""
    if spec.init_images is None:
        return [(None, None)]
    inits = sorted(p for p in spec.init_images.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not inits:
        raise DatasetError(f"init_images: no image files ({', '.join(IMAGE_SUFFIXES)}) in {spec.init_images}")
    if spec.masks is None:
        return [(init, None) for init in inits]
    masks: dict[str, Path] = {}
    for path in sorted(spec.masks.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            masks.setdefault(path.stem, path)
    pairs: list[tuple[Path | None, Path | None]] = []
    for init in inits:
        if init.stem not in masks:
            raise DatasetError(f"masks: no mask for init image {init.name} (looked for {init.stem}.* "
                               f"in {spec.masks})")
        pairs.append((init, masks[init.stem]))
    return pairs


def _size(spec: DatasetSpec, init: Path | None) -> tuple[int, int]:
    """(width, height) of the images made from ``init`` (see the module's docstring)."""
    if spec.width is not None and spec.height is not None:
        return spec.width, spec.height
    if init is None:
        return spec.width or DEFAULT_SIDE, spec.height or DEFAULT_SIDE
    from .images import default_size  # Pillow: only for init images

    width, height = default_size(init)
    return spec.width or width, spec.height or height


def resolve_adapters(spec: DatasetSpec, entry: PromptSpec, entry_index: int,
                     variables: dict[str, str]) -> tuple[tuple[str, float], ...]:
    """The adapters of an image: the spec's, then the entry's with its variables filled in (the
    entry's scale wins for a name in both), in that order."""
    merged = dict(spec.adapters)
    for name_template, scale_template in entry.adapters:
        name = name_template.format(**variables)
        key = f"prompts[{entry_index}].adapters.{name_template}"
        if not name.strip():
            raise DatasetError(f"{key}: the adapter name is empty for {variables}")
        merged.pop(name, None)  # the entry's place in the order
        merged[name] = check_scale(key, scale_template.format(**variables))
    return tuple(merged.items())


def make_plan(spec: DatasetSpec) -> Plan:
    """Expands the spec into its images. Raises DatasetError when two entries expand to the same
    prompt (their images would have the same seeds)."""
    suffix = FORMAT_SUFFIXES[spec.format]
    pairs = init_pairs(spec)
    sizes = {init: _size(spec, init) for init, _ in pairs}
    images: list[PlannedImage] = []
    names: list[str] = []
    seen: dict[str, int] = {}  # prompt_id -> entry index
    stride = spec.per_image * spec.max_rounds  # seeds each image owns (best-of-N: K * R)
    for entry_index, entry in enumerate(spec.prompts):
        for name, _ in entry.vars:
            if name not in names:
                names.append(name)
        value_lists = [values for _, values in entry.vars]
        for combination in itertools.product(*value_lists):
            variables = tuple(zip((name for name, _ in entry.vars), combination))
            prompt = entry.template.format(**dict(variables))
            adapters = resolve_adapters(spec, entry, entry_index, dict(variables))
            sweep = entry.adapter_variables()
            seed_variables = tuple(v for v in variables if v[0] not in sweep)
            for init, mask in pairs:
                init_name = init.name if init is not None else None
                digest = prompt_key_digest(spec.seed, entry.template, variables, init_name)
                if sweep:
                    seed_digest = prompt_key_digest(spec.seed, entry.template, seed_variables, init_name)
                else:
                    seed_digest = digest
                prompt_id = digest.hex()[:12]
                if prompt_id in seen:
                    raise DatasetError(f"prompts[{entry_index}]: expands to {prompt!r}, as prompts"
                                       f"[{seen[prompt_id]}] does: the images would be the same")
                seen[prompt_id] = entry_index
                prompt_seed = int.from_bytes(seed_digest[:8], "big") >> 2  # < 2**62: room for + k
                for k in range(entry.images):
                    seed = prompt_seed + k * stride
                    images.append(PlannedImage(
                        order=len(images),
                        prompt_id=prompt_id,
                        prompt=prompt,
                        negative_prompt=entry.negative_prompt if entry.negative_prompt is not None
                        else spec.negative_prompt,
                        template=entry.template,
                        variables=variables,
                        image_index=k,
                        seed=seed,
                        split=split_of(prompt_seed + k, spec.splits),
                        file_name=f"{prompt_id}-{k:04d}{suffix}",
                        init_image=init,
                        mask=mask,
                        width=sizes[init][0],
                        height=sizes[init][1],
                        adapters=adapters,
                    ))
    return Plan(tuple(images), tuple(names))
