"""The candidate scorer (best-of-N): a CLIP model and its processor, where it comes from, how it is saved.

A request with `candidates` K makes num_images * K images and keeps the best num_images by CLIPScore
(torchmetrics' definition: 100 * max(cos(image embedding, text embedding), 0), the processor's
preprocessing). The scorer is a transformers `CLIPModel` + `CLIPProcessor` folder; an artifact holds one
as `scorer/` (`lcmserve export --scorer SRC`), loadable by `CLIPModel.from_pretrained(DIR/scorer)` and
`CLIPProcessor.from_pretrained(DIR/scorer)`, the sha256 of its weights file in the manifest.

SRC (`lcmserve export --scorer SRC`, `lcmserve serve --scorer SRC`) is, in the order tried:
1. `tiny`: a small random CLIP (seeded, no download: the presets' tokenizer, 32x32 images) for tests;
   built once into `$LCMSERVE_CACHE/presets/tiny-scorer-v<N>`. Its towers share one fixed direction of
   their embeddings, so its cosines are positive and differ from image to image (a plain random CLIP
   scores most images 0, and a test of which candidate won could not fail);
2. an export artifact folder that has one (`scorer/`);
3. a folder with a CLIPModel `config.json` and a `preprocessor_config.json`;
4. a hub id (`openai/clip-vit-base-patch32`, `openai/clip-vit-large-patch14`): from the hub cache or the
   hub (HF_HUB_OFFLINE honoured).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lcmserve.export.artifact import MANIFEST_NAME, SCORER_DIR
from lcmserve.export.errors import ModelNotFoundError
from lcmserve.export.presets import cache_root, init_weights, write_tokenizer
from lcmserve.export.records import ScorerRecord
from lcmserve.export.sources import file_sha256, looks_like_hub_id

if TYPE_CHECKING:
    import torch

SCORER_PRESETS: tuple[str, ...] = ("tiny",)
TINY_SCORER_VERSION = 1  # bump when the tiny scorer changes
WEIGHTS_NAME = "model.safetensors"

# The tiny CLIP: 2 layers per tower, 32-wide, 32x32 images in 8x8 patches (a 64x64 image is resized).
_TINY_TEXT: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=77, hidden_act="quick_gelu")
_TINY_VISION: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    image_size=32, patch_size=8, hidden_act="quick_gelu")
_TINY_PROJECTION = 32
# The shared direction: both final layer norms get bias 1 on every feature and both projections a
# constant first row, so embedding[0] is the same positive number for every input of either tower:
# cos = (c^2 + <the rest>) / (|a| |b|), positive and still varying with the image.
# Measured on 12 images of the tiny model (64x64, 2 steps): with gain 1 the image tower barely sees the
# image (scores within 0.3 of each other); gain 6 on its weights and 0.15 here give scores of 34 to 45
# (std 3.2), none 0.
_TINY_SHARED_ROW = 0.15
_TINY_VISION_GAIN = 6.0


def build_tiny_scorer(folder: Path | None = None) -> tuple[Any, Any]:
    """The tiny scorer in memory: (CLIPModel float32 on the CPU, CLIPProcessor); `folder` gets the
    tokenizer files (a temp folder when None)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tokenizer(Path(tmp))
    else:
        tokenizer = write_tokenizer(folder)
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(text_config={**_TINY_TEXT, **ids}, vision_config=_TINY_VISION,
                        projection_dim=_TINY_PROJECTION)
    model: Any = CLIPModel(config)
    for name in ("text_model", "vision_model", "text_projection", "visual_projection"):
        init_weights(f"scorer.{name}", getattr(model, name), _TINY_VISION_GAIN if name == "vision_model" else 1.0)
    with torch.no_grad():
        model.logit_scale.fill_(2.6592)  # ln(1 / 0.07), CLIP's init (unused by the score)
        for norm in (model.text_model.final_layer_norm, model.vision_model.post_layernorm):
            norm.bias.fill_(1.0)
        for projection in (model.text_projection, model.visual_projection):
            projection.weight[0].fill_(_TINY_SHARED_ROW)
    side = int(_TINY_VISION["image_size"])
    images = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor: Any = CLIPProcessor  # (untyped constructor)
    return model.eval(), processor(image_processor=images, tokenizer=tokenizer)


def tiny_scorer_dir() -> Path:
    """The tiny scorer as a CLIPModel + CLIPProcessor folder, built once (atomically, as presets.preset_dir)."""
    final = cache_root() / "presets" / f"tiny-scorer-v{TINY_SCORER_VERSION}"
    if (final / WEIGHTS_NAME).is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        model, processor = build_tiny_scorer(tmp / ".tokenizer")
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        shutil.rmtree(tmp / ".tokenizer", ignore_errors=True)
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / WEIGHTS_NAME).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_scorer(source: str) -> tuple[str, Path]:
    """SRC (module doc) -> (kind: preset | artifact | folder | hub, the local CLIPModel + processor folder).
    Raises ModelNotFoundError saying what SRC is not."""
    if source in SCORER_PRESETS:
        return "preset", tiny_scorer_dir()
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            if not (path / SCORER_DIR / "config.json").is_file():
                raise ModelNotFoundError(f"artifact {path} has no scorer ({SCORER_DIR}/): export it with --scorer SRC")
            return "artifact", path / SCORER_DIR
        check_clip_folder(path, source)
        return "folder", path
    if path.exists():
        raise ModelNotFoundError(f"scorer {source} is a file; expected a folder holding a CLIPModel and its "
                                 f"processor, a preset ({', '.join(SCORER_PRESETS)}) or a hub id")
    if looks_like_hub_id(source):
        return "hub", _download(source)
    raise ModelNotFoundError(f"scorer {source!r} is not a preset ({', '.join(SCORER_PRESETS)}), an existing folder, "
                             "or a hub id (org/name, e.g. openai/clip-vit-base-patch32)")


def check_clip_folder(folder: Path, source: str) -> None:
    """A folder `CLIPModel.from_pretrained` and `CLIPProcessor.from_pretrained` can load, or ModelNotFoundError
    naming what is missing: a CLIP config.json (model_type "clip") and preprocessor_config.json."""
    config = folder / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelNotFoundError(f"scorer {source}: {folder} is not a CLIP model folder: no config.json") from None
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"scorer {source}: cannot read {config}: {e}") from e
    kind = data.get("model_type") if isinstance(data, dict) else None
    if kind != "clip":
        what = (data.get("_class_name") or kind or "model") if isinstance(data, dict) else type(data).__name__
        raise ModelNotFoundError(f"scorer {source}: {config} describes a {what!r}, not a CLIP model (CLIPModel, "
                                 "model_type \"clip\", both towers): pass e.g. openai/clip-vit-base-patch32")
    if not any((folder / name).is_file() for name in ("preprocessor_config.json", "processor_config.json")):
        raise ModelNotFoundError(f"scorer {source}: {folder} has no preprocessor_config.json or processor_config.json (the CLIPProcessor's "
                                 "image preprocessing): save the processor with the model")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.txt", "*.safetensors"]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - hub/network errors come in many types
        raise ModelNotFoundError(
            f"could not get the scorer {repo_id!r} from the Hugging Face hub ({type(e).__name__}); to work offline "
            f"pass a local CLIP folder, the preset ({', '.join(SCORER_PRESETS)}), or set HF_HUB_OFFLINE=1 with it "
            "already in the cache") from e
    check_clip_folder(folder, repo_id)
    return folder


def load_scorer(source: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
                ) -> tuple[Any, Any, ScorerRecord]:
    """SRC -> (CLIPModel in eval mode on `device` (in `dtype`, else as saved), CLIPProcessor, its record)."""
    from transformers import CLIPModel, CLIPProcessor

    kind, folder = resolve_scorer(source)
    try:
        options: dict[str, Any] = {"dtype": dtype} if dtype is not None else {}
        model: Any = CLIPModel.from_pretrained(folder, **options)
        processor = CLIPProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelNotFoundError(f"scorer {source}: {folder} does not load as a CLIPModel + CLIPProcessor "
                                 f"({type(e).__name__}: {' '.join(str(e).split())})") from e
    weights = folder / WEIGHTS_NAME
    record = ScorerRecord(source=source, kind=kind, sha256=file_sha256(weights) if weights.is_file() else "",
                          projection_dim=int(model.config.projection_dim),
                          image_size=int(model.config.vision_config.image_size))
    return model.eval().to(device), processor, record


def save_scorer(source: str, folder: Path) -> ScorerRecord:
    """Load the scorer `source` and save it (safetensors weights, its processor) as `folder`
    (an artifact's scorer/); the record's sha256 is that of the weights file written."""
    model, processor, record = load_scorer(source)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return ScorerRecord(source=record.source, kind=record.kind, sha256=file_sha256(folder / WEIGHTS_NAME),
                        projection_dim=record.projection_dim, image_size=record.image_size)
