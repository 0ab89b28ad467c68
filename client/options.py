"""GenerateOptions: what a Generate request asks for besides its prompt, the SDK's one list of it.

    options = GenerateOptions(num_inference_steps=2, width=64, height=64, output_format="png")
    client.generate("a crack in a wall", options)          # the options as one value
    client.generate("a crack in a wall", options, seed=5)  # the same with some of them changed
    client.generate("a crack in a wall", width=64, seed=5)  # or keyword arguments alone

`Client`/`AsyncClient` `generate` and `stream`, the CLI, the bench and the demo all pass their
requests' options in this type; `_convert.build_generate_request` turns it into a GenerateRequest.

Adding a request field to the SDK: its line in GenerateOptions, the same line in GenerateFields
(the keyword form, which mypy checks call sites against; a test checks the two agree), and its
line in `build_generate_request`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

from .types import AdapterInput, Decoder, ImageInput, OutputFormat, PreviewMode

if TYPE_CHECKING:  # annotations only: typing.Unpack is Python >= 3.11, and mypy bundles this module
    from typing_extensions import Self, Unpack


@dataclass(frozen=True)
class GenerateOptions:
    """The options of one Generate request, prompt aside. None means the server's default.

    Values are checked when the request is built (TypeError/ValueError naming the option), and
    ranges by the server (INVALID_ARGUMENT naming the field and its limit).
    """

    negative_prompt: str | None = None  # steered away from when guidance_scale > 1; default ""
    num_inference_steps: int | None = None  # LCM steps, 1 to the server's max_steps; default 4
    guidance_scale: float | None = None  # > 1: classifier-free guidance (2x UNet cost); default 1.0
    seed: int | None = None  # of image 0 (image i: seed + i), 0 to 2^63 - 1; default: the server picks
    width: int | None = None  # pixels, 64 to 1024, a multiple of 8; default 512
    height: int | None = None  # pixels, 64 to 1024, a multiple of 8; default 512
    num_images: int | None = None  # images of this prompt, 1 to the server's max_images; default 1
    output_format: OutputFormat = "jpeg"  # of the images and the previews
    quality: int | None = None  # JPEG/WEBP quality, 1 to 100; default 90
    preview_mode: PreviewMode = "none"  # what each step event carries
    include_latents: bool = False  # float32 latents with every step event and image
    decoder: Decoder = "unspecified"  # of the final images: vae, tiny_vae; default: the server's default
    # img2img / inpainting: the picture to start from (encoded PNG/JPEG/WEBP bytes, a path, or a PIL
    # image); width/height then default to its size floored to a multiple of 8
    init_image: ImageInput | None = None
    strength: float | None = None  # with init_image: 0 < strength <= 1, the share of the steps run; default 0.8
    mask_image: ImageInput | None = None  # inpainting: white = repaint, black = keep; only with init_image
    # Per-request LoRA adapters loaded on the server: {"cracks": 0.8} or [("cracks", 0.8), ...]; a scale
    # of None takes the adapter's default; several add up. Default: none (the model as exported)
    adapters: AdapterInput | None = None
    # Best-of-N: generate num_images * candidates images (seeds seed, seed + 1, ...) in the same batch and
    # return the best num_images by the server's CLIP score, best first; 1 to the server's max_candidates,
    # above 1 only on a server with a scorer (ModelInfo.scorer). Default 1
    candidates: int | None = None

    def replace(self, **fields: Unpack[GenerateFields]) -> Self:
        """A copy with ``fields`` changed. Raises TypeError naming an option that does not exist."""
        unknown = sorted(set(fields) - set(_FIELD_NAMES))
        if unknown:
            raise TypeError(
                f"unknown Generate option {unknown[0]!r}; the options are {', '.join(_FIELD_NAMES)}"
            )
        return dataclasses.replace(self, **fields) if fields else self


class GenerateFields(TypedDict, total=False):
    """GenerateOptions as keyword arguments (``**fields: Unpack[GenerateFields]``): same names,
    same types; every one may be left out."""

    negative_prompt: str | None
    num_inference_steps: int | None
    guidance_scale: float | None
    seed: int | None
    width: int | None
    height: int | None
    num_images: int | None
    output_format: OutputFormat
    quality: int | None
    preview_mode: PreviewMode
    include_latents: bool
    decoder: Decoder
    init_image: ImageInput | None
    strength: float | None
    mask_image: ImageInput | None
    adapters: AdapterInput | None
    candidates: int | None


_FIELD_NAMES: tuple[str, ...] = tuple(field.name for field in dataclasses.fields(GenerateOptions))


def merge_options(options: GenerateOptions | None, fields: GenerateFields) -> GenerateOptions:
    """``options`` (default: all defaults) with ``fields`` changed: what generate/stream send.

    Raises TypeError when ``options`` is not a GenerateOptions (e.g. a string passed by position).
    """
    if options is None:
        options = GenerateOptions()
    elif not isinstance(options, GenerateOptions):
        raise TypeError(
            f"options must be a GenerateOptions (give the others by keyword), got {type(options).__name__}"
        )
    return options.replace(**fields)
