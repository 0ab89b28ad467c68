"""Typed results of the lcmserve SDK: frozen dataclasses, no protobuf types.

Pictures and latents keep their bytes as sent by the server; Pillow and numpy are imported only
when a method needs them, so the SDK itself depends on grpcio and protobuf alone.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:  # only for annotations: never imported at run time by this module
    import numpy
    import PIL.Image

OutputFormat = Literal["jpeg", "png", "webp", "raw"]
"""Encoding of an image: JPEG, PNG, WEBP, or RAW = uint8 RGB pixels, shape (height, width, 3)."""

PreviewMode = Literal["none", "approx", "full", "tiny_vae"]
"""Preview per step: none, a cheap latent-to-RGB approximation at 1/8 size, a full VAE decode, or the
tiny autoencoder's (TAESD) decode at full size (a model with one only)."""

Decoder = Literal["unspecified", "vae", "tiny_vae"]
"""Decoder of the final images: the server's default, the model's VAE, or its tiny autoencoder (TAESD)."""

class SavesImage(Protocol):
    """What the SDK needs of a PIL image given as init_image or mask_image: ``save(fp, format=...)``."""

    def save(self, fp: Any, format: str | None = None) -> None: ...


ImageInput = bytes | str | os.PathLike[str] | SavesImage
"""An init_image or mask_image: encoded PNG/JPEG/WEBP bytes (sent as they are), a path to such a
file (read when the request is built), or a PIL image (sent as PNG)."""

AdapterInput = Mapping[str, float | None] | Sequence[tuple[str, float | None] | str]
"""Per-request LoRA adapters (GenerateOptions.adapters): ``{"cracks": 0.8, "spalling": 0.5}``, or pairs
``[("cracks", 0.8), ("spalling", None)]`` in request order; a scale of None (or a bare name in the
list) takes the adapter's default scale on the server. Several add up, as diffusers' set_adapters."""

# File suffix -> format, for Picture.save(); the first suffix of a format is its default.
SUFFIX_FORMATS: dict[str, OutputFormat] = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".webp": "webp",
    ".rgb": "raw",
    ".raw": "raw",
}
FORMAT_SUFFIXES: dict[OutputFormat, str] = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "raw": ".rgb"}
_PIL_FORMATS: dict[OutputFormat, str] = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


def _import_pil() -> Any:
    try:
        import PIL.Image
    except ImportError as exc:
        raise ImportError("this needs Pillow, which lcmserve does not install: pip install pillow") from exc
    return PIL.Image


def _import_numpy() -> Any:
    try:
        import numpy
    except ImportError as exc:
        raise ImportError("this needs numpy, which lcmserve does not install: pip install numpy") from exc
    return numpy


@dataclass(frozen=True)
class Picture:
    """An encoded picture: a final image or a step preview.

    ``data`` is the file content for JPEG/PNG/WEBP, and for RAW the pixels: uint8 RGB,
    row-major, shape (height, width, 3), no header.
    """

    data: bytes = field(repr=False)
    format: OutputFormat
    width: int  # pixels
    height: int  # pixels

    @property
    def nbytes(self) -> int:
        """Size of ``data`` in bytes."""
        return len(self.data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the picture to ``path`` and returns it as a Path.

        The bytes are written as they are, unless the suffix names another format
        (``.jpg``/``.jpeg``, ``.png``, ``.webp``, ``.rgb``/``.raw``): then the picture is
        converted with Pillow, e.g. a RAW picture saved as ``x.png``.
        """
        path = Path(path)
        wanted = SUFFIX_FORMATS.get(path.suffix.lower(), self.format)
        if wanted == self.format:
            path.write_bytes(self.data)
        elif wanted == "raw":
            path.write_bytes(self.to_pil().convert("RGB").tobytes())
        else:
            self.to_pil().save(path, format=_PIL_FORMATS[wanted])
        return path

    def to_pil(self) -> PIL.Image.Image:
        """Decodes to a ``PIL.Image.Image`` (RGB for RAW). Needs Pillow."""
        pil = _import_pil()
        if self.format == "raw":
            self._check_raw_size()
            return pil.frombytes("RGB", (self.width, self.height), self.data)  # type: ignore[no-any-return]
        image = pil.open(io.BytesIO(self.data))
        image.load()  # decode now, while the buffer is known to be alive
        return image  # type: ignore[no-any-return]

    def to_numpy(self) -> numpy.ndarray[Any, Any]:
        """Decodes to a uint8 array of shape (height, width, 3), RGB. Needs numpy (and Pillow
        unless the format is RAW)."""
        np = _import_numpy()
        if self.format == "raw":
            self._check_raw_size()
            pixels = np.frombuffer(self.data, dtype=np.uint8)
            return pixels.reshape(self.height, self.width, 3).copy()  # type: ignore[no-any-return]
        return np.asarray(self.to_pil().convert("RGB"))  # type: ignore[no-any-return]

    def _check_raw_size(self) -> None:
        expected = self.width * self.height * 3
        if len(self.data) != expected:
            raise ValueError(
                f"RAW picture of {self.width}x{self.height} should hold {expected} bytes "
                f"(uint8 RGB), got {len(self.data)}"
            )


@dataclass(frozen=True)
class Latents:
    """A dense tensor of latents, e.g. shape (4, height/8, width/8), float32, little-endian."""

    shape: tuple[int, ...]
    dtype: str  # numpy dtype name, e.g. "float32"
    data: bytes = field(repr=False)  # elements, row-major, little-endian

    def to_numpy(self) -> numpy.ndarray[Any, Any]:
        """Returns a numpy array of ``shape`` and ``dtype`` (a copy, writable). Needs numpy."""
        np = _import_numpy()
        dtype = np.dtype(self.dtype).newbyteorder("<")
        count = 1
        for dim in self.shape:
            count *= dim
        if count * dtype.itemsize != len(self.data):
            raise ValueError(
                f"latents of shape {self.shape} and dtype {self.dtype} should hold "
                f"{count * dtype.itemsize} bytes, got {len(self.data)}"
            )
        array = np.frombuffer(self.data, dtype=dtype).reshape(self.shape)
        return array.astype(dtype.newbyteorder("="))  # type: ignore[no-any-return]


@dataclass(frozen=True)
class StepEvent:
    """A denoising step of one image finished."""

    image_index: int  # which image of the request, 0 to num_images - 1
    step: int  # 0 to num_steps - 1
    num_steps: int
    timestep: int  # diffusion timestep, 0 to 999
    preview: Picture | None  # the denoised prediction, when a preview mode was asked for
    latents: Latents | None  # the denoised latents, when include_latents was set
    # With GenerateOptions.candidates > 1: the candidate this step belongs to (0 to num_images *
    # candidates - 1; its seed is Summary.seed + candidate; image_index is the same number). 0 otherwise.
    candidate: int = 0


@dataclass(frozen=True)
class Image:
    """One finished image of a request."""

    index: int  # which image of the request, 0 to num_images - 1
    picture: Picture
    seed: int  # reproduces this image alone (with candidates 1): request seed + index, or the candidate's
    latents: Latents | None  # final latents, when include_latents was set
    # CLIPScore of the image against the prompt (100 * max(cos, 0)) when the server has a scorer
    # (ModelInfo.scorer); None otherwise. With candidates > 1 the images come best first.
    score: float | None = None

    @property
    def data(self) -> bytes:
        """The picture's bytes (see Picture)."""
        return self.picture.data

    @property
    def format(self) -> OutputFormat:
        """The picture's format."""
        return self.picture.format

    @property
    def width(self) -> int:
        """Width in pixels."""
        return self.picture.width

    @property
    def height(self) -> int:
        """Height in pixels."""
        return self.picture.height

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the picture to ``path`` (see Picture.save)."""
        return self.picture.save(path)

    def to_pil(self) -> PIL.Image.Image:
        """Decodes the picture with Pillow (see Picture.to_pil)."""
        return self.picture.to_pil()

    def to_numpy(self) -> numpy.ndarray[Any, Any]:
        """Decodes the picture to a uint8 (height, width, 3) array (see Picture.to_numpy)."""
        return self.picture.to_numpy()


@dataclass(frozen=True)
class Timings:
    """Where the time of one request went, in milliseconds of wall time on the server."""

    queue_ms: float  # arrival -> first step of its first image
    text_ms: float  # text encoding (0 when cached)
    unet_ms: float  # UNet steps it took part in (shared with its batch)
    vae_ms: float  # VAE decodes of its images (and full previews)
    encode_ms: float  # image encoding on the host
    total_ms: float  # arrival -> last image


@dataclass(frozen=True)
class Summary:
    """The end of a request: always the last event of a stream."""

    seed: int  # seed of image 0, as given or as chosen by the server
    num_images: int
    prompt_truncated: bool  # CLIP's 77-token limit cut the prompt or the negative prompt
    prompt_tokens: int  # tokens of the prompt, start and end included, before truncation
    timings: Timings
    # Denoising steps each image ran: num_inference_steps, or with an init image
    # int(num_inference_steps * strength). 0 from a server older than this field.
    num_steps: int = 0
    # Best-of-N (GenerateOptions.candidates > 1): every candidate generated, in seed order, with its
    # score and whether it was returned; empty with candidates 1.
    candidates: tuple[Candidate, ...] = ()


@dataclass(frozen=True)
class Candidate:
    """One candidate of a best-of-N request (GenerateOptions.candidates)."""

    seed: int  # reproduces it alone with candidates 1
    score: float  # its CLIPScore (Image.score)
    returned: bool  # it was returned as an Image


GenerateEvent = StepEvent | Image | Summary
"""One event of a Generate stream: step events, then images, then one summary."""


@dataclass(frozen=True)
class GenerateResult:
    """A whole Generate call: the images (ordered by index), its summary and its step events."""

    images: list[Image]
    summary: Summary
    steps: list[StepEvent]

    @property
    def seed(self) -> int:
        """Seed of image 0."""
        return self.summary.seed

    @property
    def timings(self) -> Timings:
        """The server's timings of this request."""
        return self.summary.timings


@dataclass(frozen=True)
class LoraInfo:
    """A LoRA fused into the served model."""

    source: str  # file, folder or hub id
    sha256: str  # of its weights file, hex
    scale: float  # it was fused with; 1.0 is full strength


@dataclass(frozen=True)
class ScorerInfo:
    """The CLIP model that scores candidates (GenerateOptions.candidates) and Image.score."""

    source: str  # hub id, folder, or "tiny" (the presets' random CLIP)
    sha256: str  # of its weights file, hex
    projection_dim: int  # the embedding both towers map to
    image_size: int  # input side of its image tower, pixels


@dataclass(frozen=True)
class AdapterInfo:
    """A per-request LoRA adapter the server holds (GenerateOptions.adapters names it)."""

    name: str
    source: str  # file, folder or hub id, as loaded
    sha256: str  # of its weights file, hex
    rank: int  # its LoRA rank (the largest of its modules)
    targets: list[str]  # parts it adapts: "unet", "text_encoder"
    default_scale: float  # what a request naming it without a scale gets
    format: str = ""  # key layout of its file: "kohya" or "diffusers"
    modules: int = 0  # modules it adapts


@dataclass(frozen=True)
class AdapterList:
    """ListAdapters: the adapters loaded now, the free slots, and whether loading is allowed."""

    adapters: list[AdapterInfo]  # by name
    free_slots: int
    loading_allowed: bool  # the server runs with --allow-adapter-loading


@dataclass(frozen=True)
class Limits:
    """The limits the server validates Generate requests against."""

    max_steps: int
    min_side: int  # pixels
    max_side: int  # pixels
    side_multiple: int  # pixels
    max_images: int  # per request
    max_prompt_chars: int
    min_guidance_scale: float
    max_guidance_scale: float
    max_batch_size: int  # rows in one UNet call (a guided image takes two)
    max_queued_requests: int  # waiting before RESOURCE_EXHAUSTED
    max_image_bytes: int = 0  # of init_image and of mask_image, each; 0 from a server without img2img
    max_image_pixels: int = 0  # width x height of each, decoded
    max_adapters_per_request: int = 0  # GenerateOptions.adapters; 0 from a server without adapters
    max_adapters: int = 0  # adapter slots: most adapters loaded at once
    max_adapter_rank: int = 0  # highest LoRA rank an adapter may have
    max_candidates: int = 0  # GenerateOptions.candidates; 0 from a server without best-of-N


@dataclass(frozen=True)
class ModelInfo:
    """The served model, as GetModelInfo describes it."""

    base: str  # hub id, folder or preset name
    loras: list[LoraInfo]  # in fusion order
    dtype: str  # "float16", "bfloat16" or "float32"
    device: str  # e.g. "cuda:0" or "cpu"
    backend: str  # "eager", "compile", "aoti" or "onnx"
    limits: Limits
    server_version: str
    # Every engine's device, one engine process each (`serve --devices cuda:0,cuda:1`); device is
    # the first. Empty from a server older than this field.
    devices: list[str] = field(default_factory=list)
    # Decoders the model has ("vae", "tiny_vae"), what an unspecified decoder means, and who
    # encodes JPEG ("gpu" or "host"). Empty from a server older than these fields.
    decoders: list[str] = field(default_factory=list)
    default_decoder: str = ""
    jpeg_encoder: str = ""
    # The backend's state by part, for operators: "graphs.unet" -> "enabled" or "disabled: <why>",
    # "fallbacks.unet" -> calls a compiled part ran eagerly. Empty from an older server.
    backend_details: dict[str, str] = field(default_factory=dict)
    # Per-request LoRA adapters loaded now (GenerateOptions.adapters names them), by name.
    adapters: list[AdapterInfo] = field(default_factory=list)
    # The CLIP model that scores images (Image.score, GenerateOptions.candidates); None without one.
    scorer: ScorerInfo | None = None
