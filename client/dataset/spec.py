"""The dataset spec: a YAML file (or a dict) checked into a frozen DatasetSpec.

Every key is documented in docs/dataset.md. Errors are DatasetError naming the key as a path
(``prompts[1].vars.kind``), its value and what is allowed; unknown keys are errors too, so a typo
does not silently fall back to a default.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ..types import OutputFormat


class DatasetError(Exception):
    """The dataset job cannot run as asked: a bad spec, a bad option, an output folder that does
    not belong to this spec or model. The message names the key or option."""


SPEC_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")  # raw has no file header: not here
DEFAULT_SPLITS: dict[str, float] = {"train": 1.0}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # of init images and masks

# Metadata columns the job writes itself; a template variable may not take one of these names.
RESERVED_COLUMNS = frozenset(
    {
        "file_name", "prompt", "negative_prompt", "seed", "num_inference_steps", "guidance_scale",
        "width", "height", "format", "template", "prompt_id", "image_index", "sha256",
        "init_image", "init_sha256", "strength", "mask_file_name", "mask_sha256", "split",
        "score", "candidates", "rounds", "passed", "adapters",
    }
)

_TOP_KEYS = (
    "prompts", "negative_prompt", "seed", "num_inference_steps", "guidance_scale", "width", "height",
    "format", "quality", "splits", "init_images", "strength", "masks", "images_per_request",
    "candidates", "min_score", "max_rounds", "on_fail", "adapters",
)
_PROMPT_KEYS = ("template", "vars", "images", "negative_prompt", "adapters")
ON_FAIL = ("keep", "skip")
MAX_CANDIDATES = 8  # the server's limit on GenerateRequest.candidates (its GetModelInfo may say less)
MAX_SCALE = 8.0  # adapter scales are in [-8, 8], as the server checks
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


@dataclass(frozen=True)
class PromptSpec:
    """One entry of ``prompts``: a template, its variables, and images per expanded prompt."""

    template: str  # str.format syntax: "{name}" is a variable, "{{" a literal brace
    vars: tuple[tuple[str, tuple[str, ...]], ...]  # (name, values) in the spec's order
    images: int  # per expanded prompt (per init image, with init_images)
    negative_prompt: str | None  # None: the spec's negative_prompt
    # (name, scale) templates: "{var}" in either takes the entry's variable; a scale resolves to a
    # number. Added to the spec's adapters (the entry's scale wins for a name in both).
    adapters: tuple[tuple[str, str], ...] = ()

    def adapter_variables(self) -> tuple[str, ...]:
        """The variables used in the adapters but not in the template: they do not change the seed,
        so a sweep over adapters or scales compares the same noise."""
        in_template = set(_fields(self.template))
        used = [f for name, scale in self.adapters for f in (*_fields(name), *_fields(scale))]
        return tuple(name for name, _ in self.vars if name in used and name not in in_template)


@dataclass(frozen=True)
class DatasetSpec:
    """A checked spec. Paths are absolute (relative ones are taken from the spec file's folder)."""

    prompts: tuple[PromptSpec, ...]
    negative_prompt: str = ""
    seed: int = 0  # every image's seed derives from it (see plan.prompt_seed)
    num_inference_steps: int = 4
    guidance_scale: float = 1.0
    width: int | None = None  # pixels; None: 512, or with init_images each one's width floored to 8
    height: int | None = None  # pixels; None: 512, or with init_images each one's height floored to 8
    format: OutputFormat = "png"
    quality: int | None = None  # JPEG/WEBP quality 1-100; None: the server's default (90)
    splits: tuple[tuple[str, float], ...] = (("train", 1.0),)  # (name, fraction), fractions sum to 1
    init_images: Path | None = None  # a folder: img2img over every image in it
    strength: float | None = None  # img2img/inpainting strength, (0, 1]
    masks: Path | None = None  # a folder: one mask per init image, same file stem
    images_per_request: int = 1  # consecutive seeds of one expanded prompt sent as one request
    # Best-of-N (docs/dataset.md): None = the key is absent (no score columns); each image is its
    # best of K candidates, retried with the next K seeds while below min_score, up to max_rounds.
    candidates: int | None = None
    min_score: float | None = None
    max_rounds: int = 1
    on_fail: str = "keep"  # below min_score after max_rounds: "keep" the best one, or "skip" it
    adapters: tuple[tuple[str, float], ...] = ()  # every request's adapters (name, scale)

    @property
    def best_of_n(self) -> bool:
        """Images are picked by score: the metadata has score, candidates, rounds and passed."""
        return self.candidates is not None or self.min_score is not None

    @property
    def per_image(self) -> int:
        """K: candidates per request (1 without best-of-N)."""
        return self.candidates or 1

    @property
    def uses_adapters(self) -> bool:
        """The metadata has an adapters column."""
        return bool(self.adapters) or any(p.adapters for p in self.prompts)

    def as_json(self) -> dict[str, Any]:
        """The spec as plain JSON values (recorded in dataset.json), defaults written out (a width or
        height left to each init image's size is null)."""
        return {
            "prompts": [
                {
                    "template": p.template,
                    "vars": {name: list(values) for name, values in p.vars},
                    "images": p.images,
                    **({"negative_prompt": p.negative_prompt} if p.negative_prompt is not None else {}),
                    **({"adapters": dict(p.adapters)} if p.adapters else {}),
                }
                for p in self.prompts
            ],
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "width": self.width if self.width is not None or self.init_images is not None else 512,
            "height": self.height if self.height is not None or self.init_images is not None else 512,
            "format": self.format,
            "quality": self.quality,
            "splits": dict(self.splits),
            "init_images": str(self.init_images) if self.init_images is not None else None,
            "strength": self.strength,
            "masks": str(self.masks) if self.masks is not None else None,
            "images_per_request": self.images_per_request,
            **({"candidates": self.per_image} if self.best_of_n else {}),
            **({"min_score": self.min_score, "max_rounds": self.max_rounds, "on_fail": self.on_fail}
               if self.min_score is not None else {}),
            **({"adapters": dict(self.adapters)} if self.adapters else {}),
        }


def load_spec(source: str | Path | Mapping[str, Any]) -> DatasetSpec:
    """Reads and checks a spec: a YAML file's path, or the spec as a mapping (paths in it are
    taken from the current folder). Raises DatasetError naming the bad key."""
    if isinstance(source, Mapping):
        return parse_spec(source, Path.cwd())
    path = Path(source)
    try:
        import yaml
    except ImportError as exc:
        raise DatasetError("reading a YAML spec needs PyYAML: pip install pyyaml") from exc
    try:
        with path.open(encoding="utf-8") as stream:  # a stream: YAML's errors then name the file
            data = yaml.safe_load(stream)
    except OSError as exc:
        raise DatasetError(f"cannot read the spec {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text: {exc}") from exc
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise DatasetError(f"{path}: the spec must be a mapping of keys (prompts, seed, ...), "
                           f"got {type(data).__name__}")
    return parse_spec(data, path.resolve().parent)


def parse_spec(data: Mapping[str, Any], base: Path) -> DatasetSpec:
    """Checks a spec mapping; relative paths are resolved against ``base``."""
    _check_keys("the spec", data, _TOP_KEYS)
    if "prompts" not in data:
        raise DatasetError("prompts: missing; give a list of {template: ..., images: N} entries")
    raw_prompts = data["prompts"]
    if not isinstance(raw_prompts, list) or not raw_prompts:
        raise DatasetError(f"prompts: must be a non-empty list, got {raw_prompts!r}")
    prompts = tuple(_prompt(f"prompts[{i}]", entry) for i, entry in enumerate(raw_prompts))
    fmt = _choice("format", data.get("format", "png"), SPEC_FORMATS)
    quality = data.get("quality")
    if quality is not None:
        quality = _int("quality", quality, 1, 100)
    init_images = _folder("init_images", data.get("init_images"), base)
    masks = _folder("masks", data.get("masks"), base)
    strength = data.get("strength")
    if strength is not None:
        strength = _number("strength", strength)
        if not 0 < strength <= 1:
            raise DatasetError(f"strength: {strength!r} must be in (0, 1]")
    if masks is not None and init_images is None:
        raise DatasetError("masks: needs init_images (inpainting paints over an init image)")
    if strength is not None and init_images is None:
        raise DatasetError("strength: needs init_images (it is how far img2img moves from them)")
    candidates = data.get("candidates")
    if candidates is not None:
        candidates = _int("candidates", candidates, 1, MAX_CANDIDATES)
    min_score = data.get("min_score")
    if min_score is not None:
        min_score = _number("min_score", min_score)
    for key in ("max_rounds", "on_fail"):
        if key in data and min_score is None:
            raise DatasetError(f"{key}: needs min_score (rounds retry an image whose best candidate scores below it)")
    per_request = _int("images_per_request", data.get("images_per_request", 1), 1, 1024)
    if per_request > 1 and (candidates is not None or min_score is not None):
        raise DatasetError(f"images_per_request: {per_request} with candidates or min_score: each request then "
                           "makes one image, its best candidate; remove images_per_request")
    return DatasetSpec(
        prompts=prompts,
        negative_prompt=_str("negative_prompt", data.get("negative_prompt", "")),
        seed=_int("seed", data.get("seed", 0), 0, 2**63 - 1),
        num_inference_steps=_int("num_inference_steps", data.get("num_inference_steps", 4), 1, 1000),
        guidance_scale=_number("guidance_scale", data.get("guidance_scale", 1.0)),
        width=_side("width", data["width"]) if data.get("width") is not None else None,
        height=_side("height", data["height"]) if data.get("height") is not None else None,
        format=cast(OutputFormat, fmt),
        quality=quality,
        splits=_splits(data.get("splits", DEFAULT_SPLITS)),
        init_images=init_images,
        strength=strength,
        masks=masks,
        images_per_request=per_request,
        candidates=candidates,
        min_score=min_score,
        max_rounds=_int("max_rounds", data.get("max_rounds", 1), 1, 100),
        on_fail=_choice("on_fail", data.get("on_fail", "keep"), ON_FAIL),
        adapters=tuple((name, float(scale)) for name, scale in _adapters("adapters", data.get("adapters"), None)),
    )


# ---- checks of single keys ------------------------------------------------------------------------


def _check_keys(where: str, data: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [str(key) for key in data if key not in allowed]
    if unknown:
        raise DatasetError(f"{where}: unknown key {unknown[0]!r}; the keys are {', '.join(allowed)}")


def _prompt(key: str, entry: object) -> PromptSpec:
    if isinstance(entry, str):  # a bare string: one template, one image
        entry = {"template": entry}
    if not isinstance(entry, Mapping):
        raise DatasetError(f"{key}: must be a mapping with a template, got {entry!r}")
    _check_keys(key, entry, _PROMPT_KEYS)
    if "template" not in entry:
        raise DatasetError(f"{key}.template: missing")
    template = _str(f"{key}.template", entry["template"])
    if not template.strip():
        raise DatasetError(f"{key}.template: empty")
    raw_vars = entry.get("vars") or {}
    if not isinstance(raw_vars, Mapping):
        raise DatasetError(f"{key}.vars: must be a mapping of name: [values], got {raw_vars!r}")
    variables: list[tuple[str, tuple[str, ...]]] = []
    for name, values in raw_vars.items():
        where = f"{key}.vars.{name}"
        if not isinstance(name, str) or not _VAR_NAME.match(name):
            raise DatasetError(f"{where}: a variable name must be an identifier (letters, digits, _)")
        if name in RESERVED_COLUMNS:
            raise DatasetError(f"{where}: {name!r} is a metadata column of its own; rename the variable")
        if isinstance(values, (str, int, float)) and not isinstance(values, bool):
            values = [values]
        if not isinstance(values, list) or not values:
            raise DatasetError(f"{where}: must be a non-empty list of values, got {values!r}")
        texts = tuple(_var_value(f"{where}[{i}]", v) for i, v in enumerate(values))
        if len(set(texts)) != len(texts):
            raise DatasetError(f"{where}: values repeat ({list(texts)}): images would repeat")
        variables.append((name, texts))
    names = [name for name, _ in variables]
    adapters = _adapters(f"{key}.adapters", entry.get("adapters"), names)
    _check_template(key, template, names, [t for pair in adapters for t in pair])
    negative = entry.get("negative_prompt")
    return PromptSpec(
        template=template,
        vars=tuple(variables),
        images=_int(f"{key}.images", entry.get("images", 1), 1, 1_000_000),
        negative_prompt=None if negative is None else _str(f"{key}.negative_prompt", negative),
        adapters=adapters,
    )


def check_scale(key: str, value: object) -> float:
    """An adapter scale: a finite number in [-8, 8] (a string from a template is parsed)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise DatasetError(f"{key}: scale {value!r} is not a number") from None
    scale = _number(key, value)
    if not -MAX_SCALE <= scale <= MAX_SCALE:
        raise DatasetError(f"{key}: scale {scale:g} is out of range {-MAX_SCALE:g} to {MAX_SCALE:g}")
    return scale


def _fields(template: str) -> list[str]:
    """The "{name}" fields of a str.format template (checked before)."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _adapters(key: str, value: object, names: list[str] | None) -> tuple[tuple[str, str], ...]:
    """``adapters``: a mapping of adapter name to scale. In a prompt entry (``names``: its
    variables) a name or scale may be a "{var}" template; the spec's own (``names`` None) are literal."""
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not value:
        raise DatasetError(f"{key}: must be a mapping of adapter name: scale, e.g. {{cracks: 0.8}}, got {value!r}")
    pairs = []
    for name, scale in value.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{where}: an adapter name must be a non-empty string")
        if isinstance(scale, str) and names is not None:
            _check_template(where, scale, names, [], fields_only=True)  # a number once resolved (plan.py)
            if not _fields(scale):
                check_scale(where, scale)
        else:
            check_scale(where, scale)
        if names is not None:
            _check_template(where, name, names, [], fields_only=True)
        elif "{" in name:
            raise DatasetError(f"{where}: the spec's adapters are literal; sweep an adapter in a prompt entry's "
                               "adapters with a variable")
        pairs.append((name, str(scale)))
    return tuple(pairs)


def _check_template(key: str, template: str, names: list[str], more: list[str], fields_only: bool = False) -> None:
    """Every field of ``template`` is a variable; every variable is used in it or in ``more``
    (the entry's adapter templates). ``fields_only``: ``key`` is the field's own path."""
    where = key if fields_only else f"{key}.template"
    entry = key.rsplit(".adapters", 1)[0]
    try:
        fields = _fields(template)
        used = fields + [f for other in more for f in _fields(other)]
    except ValueError as exc:
        raise DatasetError(f"{where}: {exc} in {template!r} (write {{{{ for a literal brace)") from exc
    for field in fields:
        if field not in names:
            known = ", ".join(names) or "none"
            raise DatasetError(f"{where}: {{{field}}} has no entry in {entry}.vars (vars: {known})")
    if fields_only:
        return
    for name in names:
        if name not in used:
            raise DatasetError(f"{key}.vars.{name}: not used in the template {template!r} nor in its adapters")


def _var_value(key: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DatasetError(f"{key}: must be a string or a number, got {value!r}")
    return str(value)  # metadata columns are strings, whatever YAML made of them


def _str(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise DatasetError(f"{key}: must be a string, got {value!r}")
    return value


def _int(key: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DatasetError(f"{key}: must be an integer, got {value!r}")
    if not low <= value <= high:
        raise DatasetError(f"{key}: {value} is out of range {low} to {high}")
    return value


def _number(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DatasetError(f"{key}: must be a finite number, got {value!r}")
    return float(value)


def _side(key: str, value: object) -> int:
    side = _int(key, value, 64, 1024)
    if side % 8:
        raise DatasetError(f"{key}: {side} must be a multiple of 8 (64 to 1024)")
    return side


def _choice(key: str, value: object, allowed: tuple[str, ...]) -> str:
    name = value.strip().lower() if isinstance(value, str) else value
    name = "jpeg" if name == "jpg" else name
    if name not in allowed:
        raise DatasetError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    return str(name)


def _splits(value: object) -> tuple[tuple[str, float], ...]:
    if not isinstance(value, Mapping) or not value:
        raise DatasetError(f"splits: must be a mapping of name: fraction, got {value!r}")
    splits = []
    for name, fraction in value.items():
        if not isinstance(name, str) or not _VAR_NAME.match(name):
            raise DatasetError(f"splits.{name}: a split name must be an identifier (e.g. train)")
        share = _number(f"splits.{name}", fraction)
        if share < 0:
            raise DatasetError(f"splits.{name}: {share} must be >= 0")
        splits.append((name, share))
    total = sum(share for _, share in splits)
    if abs(total - 1.0) > 1e-6:
        raise DatasetError(f"splits: the fractions sum to {total:g}, not 1 ({dict(splits)})")
    return tuple(splits)


def _folder(key: str, value: object, base: Path) -> Path | None:
    if value is None:
        return None
    folder = (base / _str(key, value)).resolve()
    if not folder.is_dir():
        raise DatasetError(f"{key}: {value!r} is not a folder (looked at {folder})")
    return folder
