"""The candidate scorer on the device: CLIPScore of decoded images against their prompt, batched.

    score = 100 * max(cos(image embedding, text embedding), 0)      (torchmetrics' CLIPScore)

The image embedding is the CLIP image tower's of the image as its CLIPProcessor prepares it, computed
here with torch on the device from the decoder's uint8 pixels, the processor's steps in its order:

    resize       shortest edge to size["shortest_edge"] (or to size height x width), bicubic with
                 antialias as PIL's BICUBIC (torch's antialiased kernel uses PIL's a = -0.5), in PIL's
                 two passes, width then height, each rounded to uint8 as PIL leaves it (one pass
                 rounded once differs from PIL by 0.14 levels on average, which moved the tiny
                 scorer's scores by 0.13; two passes by 0.005)
    center crop  crop_size, the top-left corner at ((H - h) // 2, (W - w) // 2)
    rescale      * rescale_factor (1 / 255)
    normalize    (x - image_mean) / image_std

so the pixels never leave the device for scoring. The text embedding is the text tower's of the
prompt as the processor's tokenizer reads it (truncated to the text tower's positions), once per
request (`tokenize` runs off the loop thread, at submit).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch

from lcmserve.export.artifact import is_artifact, read_manifest
from lcmserve.export.records import ScorerRecord


log = logging.getLogger("lcmserve.scorer")

_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's resample numbers the CLIP processors use


class ClipScorer:
    """A CLIPModel and its processor's preprocessing on one device (module doc)."""

    def __init__(self, model: Any, processor: Any, record: ScorerRecord, device: torch.device,
                 text_cache_size: int = 256) -> None:
        self.model = model
        self.record = record
        self.device = device
        self.dtype: torch.dtype = next(model.parameters()).dtype
        self.tokenizer = processor.tokenizer
        self.max_text = int(model.config.text_config.max_position_embeddings)
        images = processor.image_processor
        size = dict(images.size or {}) if images.do_resize else {}
        self.shortest_edge: int | None = size.get("shortest_edge")
        self.resize_to: tuple[int, int] | None = (int(size["height"]), int(size["width"])) \
            if "height" in size and "width" in size and self.shortest_edge is None else None
        crop = dict(images.crop_size or {}) if images.do_center_crop else {}
        self.crop: tuple[int, int] | None = (int(crop["height"]), int(crop["width"])) if crop else None
        resample = int(images.resample) if images.resample is not None else 3
        self.mode = _RESAMPLE.get(resample, "bicubic")
        if resample not in _RESAMPLE:
            log.warning("scorer %s: resample %s is not bilinear or bicubic; resizing bicubic", record.source, resample)
        self.scale = float(images.rescale_factor) if images.do_rescale else 1.0
        mean = images.image_mean if images.do_normalize else [0.0, 0.0, 0.0]
        std = images.image_std if images.do_normalize else [1.0, 1.0, 1.0]
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self._texts: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()  # ids -> (D,) unit embedding
        self._text_cache_size = text_cache_size

    @classmethod
    def load(cls, source: str, device: torch.device, dtype: torch.dtype) -> ClipScorer:
        """SRC (export/scorer.py: tiny, an artifact with scorer/, a CLIP folder, a hub id) on `device` in
        `dtype`; an artifact's record is its manifest's (with the sha256 export wrote)."""
        from lcmserve.export.scorer import load_scorer

        model, processor, record = load_scorer(source, dtype=dtype, device=device)
        exported = read_manifest(source).scorer if is_artifact(source) else None
        return cls(model, processor, exported or record, device)

    # ---- text (tokenize off the loop; embed once per prompt) -------------------------------------

    def tokenize(self, prompt: str) -> tuple[int, ...]:
        """The prompt as the processor's tokenizer reads it, truncated to the text tower's positions."""
        return tuple(self.tokenizer(prompt, truncation=True, max_length=self.max_text).input_ids)

    def text_embedding(self, ids: tuple[int, ...]) -> torch.Tensor:
        """Token ids -> (D,) float32 unit text embedding on the device (an LRU cache by ids)."""
        cached = self._texts.get(ids)
        if cached is not None:
            self._texts.move_to_end(ids)
            return cached
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)  # (1, T): one prompt, no padding
        pooled = self.model.text_model(input_ids=tokens).pooler_output  # (1, width)
        embedding = _unit(self.model.text_projection(pooled).float())[0]  # (D,)
        self._texts[ids] = embedding
        if len(self._texts) > self._text_cache_size:
            self._texts.popitem(last=False)
        return embedding

    # ---- images ----------------------------------------------------------------------------------

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on the device -> (B, 3, h, w) pixel values as the CLIPProcessor makes them,
        in the model's dtype."""
        x = pixels.float()
        height, width = int(x.shape[2]), int(x.shape[3])
        size = self._resized(height, width)
        if width != size[1]:  # PIL resamples horizontally first, to uint8, then vertically
            x = self._resample(x, (height, size[1]))
        if height != size[0]:
            x = self._resample(x, size)
        if self.crop is not None:
            x = _center_crop(x, *self.crop)
        x = (x * self.scale - self.mean) / self.std
        return x.to(self.dtype)

    def _resample(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=size, mode=self.mode, antialias=True, align_corners=False)
        return x.round().clamp(0, 255)  # uint8 levels, as PIL's pass leaves them

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        """transformers' get_resize_output_image_size(default_to_square=False): the shortest edge to
        `shortest_edge`, the other int(shortest_edge * long / short)."""
        if self.resize_to is not None:
            return self.resize_to
        if self.shortest_edge is None:
            return height, width
        short, long = min(height, width), max(height, width)
        new_long = int(self.shortest_edge * long / short)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 on the device -> (B, D) float32 unit image embeddings."""
        pooled = self.model.vision_model(pixel_values=self.preprocess(pixels)).pooler_output  # (B, width)
        return _unit(self.model.visual_projection(pooled).float())

    def scores(self, pixels: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 images and (B, D) unit text embeddings (each image's prompt) -> (B,) float32
        CLIPScores on the device: 100 * max(cos, 0)."""
        cosine = (self.image_embeddings(pixels) * texts).sum(dim=-1)
        return 100.0 * cosine.clamp(min=0)


def _unit(x: torch.Tensor) -> torch.Tensor:
    unit: torch.Tensor = x / x.norm(p=2, dim=-1, keepdim=True)
    return unit


def _center_crop(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, height, width), as transformers' center_crop (zero padding when smaller)."""
    h, w = int(x.shape[2]), int(x.shape[3])
    if height > h or width > w:
        pad_h, pad_w = max(height - h, 0), max(width - w, 0)
        x = torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        h, w = int(x.shape[2]), int(x.shape[3])
    top, left = (h - height) // 2, (w - width) // 2
    return x[:, :, top: top + height, left: left + width]
