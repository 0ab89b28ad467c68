"""Everything that crosses the pipe between the gRPC edge and the engine process, as frozen dataclasses.

    edge -> engine   Submit(rid, params, deadline, arrival)   a validated request to run
                     Cancel(rid)                              the client went away: drop its samples
                     Stop()                                   fail what is left UNAVAILABLE, then exit
    engine -> edge   Ready(info) | LoadFailed(message)        once, after loading and warm-up
                     Events(events, metrics)                  per engine iteration (and per encoded picture):
                                                              each request's events in order, metric updates
                     LoopDied(reason)                         the engine loop itself died; the process exits

A request's events, in the order the engine emits them: StepEvent..., ImageEvent..., Summary, or a
Failure at any point (Summary and Failure are terminal). Both sides dispatch on these types with
`match`; nothing here imports torch, so the edge can unpickle them without it.
"""

from __future__ import annotations

from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from lcmserve.export.records import AdapterRecord as AdapterRecord  # with the other records (torch-free); re-exported

if TYPE_CHECKING:
    from lcmserve.export.records import LoraRecord, ScorerRecord

    from .model.runtime import ModelSpec


# ---- a validated request ------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationParams:
    """A validated GenerateRequest (server/edge/validation.py makes these), defaults filled in."""

    prompt_ids: tuple[int, ...]  # CLIP ids, truncated and padded to 77
    negative_ids: tuple[int, ...]  # ids of the negative prompt ("" when none)
    num_steps: int
    guidance_scale: float  # > 1: classifier-free guidance with the negative prompt
    seed: int  # of image 0; image i uses seed + i
    width: int  # pixels
    height: int
    num_images: int
    output_format: str  # a name of lcmserve.names.OUTPUT_FORMAT_VALUES: jpeg | png | webp | raw
    quality: int  # JPEG/WEBP quality, 1..100
    preview_mode: str  # a name of lcmserve.names.PREVIEW_MODE_VALUES: none | approx | full | tiny_vae
    include_latents: bool
    prompt_truncated: bool = False
    prompt_tokens: int = 0
    decoder: str = "unspecified"  # of the final images: vae | tiny_vae | unspecified (the model's default_decoder)
    # img2img / inpainting (server/edge/images.py decodes and resizes them at the edge, off its event loop):
    init_image: bytes | None = None  # (height, width, 3) uint8 RGB, resized as VaeImageProcessor does
    mask_image: bytes | None = None  # (height, width) uint8 grey, resized likewise; white = repaint
    strength: float = 1.0  # with init_image: how far it is noised (0 < strength <= 1)
    # Per-request adapters (issue 21): (name, scale) in request order, names checked against the loaded
    # adapters, scales filled from each adapter's default; the engine resolves names to slots at submit.
    adapters: tuple[tuple[str, float], ...] = ()
    candidates: int = 1  # best-of-N (issue 23): num_images * candidates samples, the best num_images returned
    prompt: str = ""  # the prompt's text, for the scorer's own tokenizer (best-of-N, Image.score)

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def start_step(self) -> int:
        """Index in the num_steps schedule of the first step run: 0 for text-to-image; with an init
        image, as diffusers' img2img/inpaint `get_timesteps`: the last int(num_steps * strength) run."""
        if self.init_image is None:
            return 0
        return max(self.num_steps - min(int(self.num_steps * self.strength), self.num_steps), 0)

    @property
    def steps_run(self) -> int:
        """Denoising steps each image runs (may be 0 for a strength too small: validation refuses it)."""
        return self.num_steps - self.start_step

    @property
    def samples(self) -> int:
        """Images the engine generates: num_images * candidates (seeds seed .. seed + samples - 1)."""
        return self.num_images * self.candidates

    @property
    def rows_per_image(self) -> int:
        """Rows of a UNet call one image takes: conditional (+ unconditional when guided)."""
        return 2 if self.guided else 1


# ---- what a request gets back ---------------------------------------------------------------------


@dataclass(frozen=True)
class HostTensor:
    """A float32 tensor copied off the device once, in the engine process: little-endian bytes."""

    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class Picture:
    """Encoded pixels: JPEG/PNG/WEBP bytes, or RAW uint8 RGB in (H, W, 3) order."""

    data: bytes
    format: str  # jpeg | png | webp | raw
    width: int
    height: int


@dataclass
class Timings:
    """Where a request's time went, in ms of wall time (the proto's Timings)."""

    queue_ms: float = 0.0  # arrival -> first image admitted to the batch
    text_ms: float = 0.0  # text encoding (0 when cached)
    unet_ms: float = 0.0  # UNet calls it took part in (shared with its batch)
    vae_ms: float = 0.0  # VAE decodes of its images and full previews (shared)
    encode_ms: float = 0.0  # host image encoding
    total_ms: float = 0.0  # arrival -> summary, filled by the edge


@dataclass(frozen=True)
class StepEvent:
    image_index: int
    step: int  # 0-based
    num_steps: int
    timestep: int  # diffusion timestep of this step, 0..999
    preview: Picture | None  # the denoised prediction, when a preview was asked for
    latents: HostTensor | None  # (4, h, w) denoised latents, when asked for
    candidate: int = 0  # with candidates > 1: the candidate (= image_index), its seed Summary.seed + candidate


@dataclass(frozen=True)
class ImageEvent:
    index: int
    seed: int
    picture: Picture
    latents: HostTensor | None  # (4, h, w) final latents, when asked for
    score: float | None = None  # its CLIPScore when the engine has a scorer


@dataclass
class RequestTrace:
    """Where one request's time went inside the engine, as time.perf_counter() instants (CLOCK_MONOTONIC:
    one clock for both processes of a machine), made only when Submit.trace asks; the edge turns them
    into its trace's spans (server/edge/tracing.py). Filled by the loop, and by the encoders under the
    request's lock, before its Summary leaves."""

    device: str = ""  # the engine's
    admitted: float = 0.0  # its first image joined the batch: the end of `queue`
    text: tuple[float, float] | None = None  # (start, end) of the text encoding of its prompts
    steps: list[tuple[int, int, int, float, float]] = field(default_factory=list)  # per UNet call it was
    # in: (step index, timestep, rows in that call, start, end), host times (on CUDA: launch, not GPU time)
    decode: tuple[float, float] | None = None  # first start, last end of its images' decodes
    encode: tuple[float, float] | None = None  # likewise of its images' encodes

    @staticmethod
    def widen(span: tuple[float, float] | None, start: float, end: float) -> tuple[float, float]:
        return (start, end) if span is None else (min(span[0], start), max(span[1], end))


@dataclass(frozen=True)
class CandidateScore:
    """One candidate of a best-of-N request (the proto's Candidate)."""

    seed: int
    score: float  # CLIPScore
    returned: bool  # sent as an ImageEvent


@dataclass(frozen=True)
class Summary:
    seed: int
    num_images: int
    prompt_truncated: bool
    prompt_tokens: int
    timings: Timings  # complete: every earlier event of the request was encoded
    num_steps: int = 0  # denoising steps each image ran (GenerationParams.steps_run)
    candidates: tuple[CandidateScore, ...] = ()  # with candidates > 1: every candidate, in seed order
    trace: RequestTrace | None = None  # when Submit.trace asked for it


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    message: str


Event = StepEvent | ImageEvent | Summary | Failure
TERMINAL = (Summary, Failure)


# ---- metric updates (the engine measures, the edge owns the Prometheus registry) -------------------


@dataclass(frozen=True)
class Queued:
    delta: int  # +1 a request waits for a batch slot, -1 it left the queue


@dataclass(frozen=True)
class Admitted:
    queue_s: float  # arrival -> admitted


@dataclass(frozen=True)
class UNetTiming:
    seconds: float
    rows: int


@dataclass(frozen=True)
class VaeDecode:
    seconds: float


@dataclass(frozen=True)
class GraphStats:
    name: str  # the callable: "unet", "vae", "tiny_vae"
    counters: tuple[tuple[str, int], ...]  # cuda_graphs.BucketedGraphs.stats(): captures, evictions, eager_calls, ...


@dataclass(frozen=True)
class BackendState:
    """The engine's backend state when it changed: each graphed callable's CUDA-graph state ("enabled" or
    "disabled: <why>") and each compiled part's count of calls run eagerly (GetModelInfo, /metrics)."""

    graphs: tuple[tuple[str, str], ...]  # (callable, state)
    fallbacks: tuple[tuple[str, int], ...] = ()  # (part, calls run eagerly)


@dataclass(frozen=True)
class DeviceMemory:
    """A CUDA engine's device memory now (engine/memory.py), in bytes."""

    device: str  # "cuda:0"
    allocated: int  # held by tensors
    reserved: int  # held by the caching allocator (allocated + cached)
    peak: int  # the most ever allocated


MetricUpdate = Queued | Admitted | UNetTiming | VaeDecode | GraphStats | BackendState | DeviceMemory


# ---- per-request adapters (issue 21) -----------------------------------------------------------------


@dataclass(frozen=True)
class LoadAdapter:
    """edge -> engine: load a LoRA into a free slot between iterations; answered by AdapterReply."""

    ticket: int  # matches the reply
    name: str
    source: str
    scale: float  # its default scale


@dataclass(frozen=True)
class UnloadAdapter:
    """edge -> engine: refuse new requests naming it; free its slot once no admitted request uses it."""

    ticket: int
    name: str


@dataclass(frozen=True)
class AdapterReply:
    """engine -> edge: how a LoadAdapter/UnloadAdapter went: the adapter loaded (None after an unload),
    or a Failure whose code is the gRPC status to answer with."""

    ticket: int
    adapter: AdapterRecord | None = None
    failure: Failure | None = None


# ---- the pipe ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    rid: int
    params: GenerationParams
    deadline: float | None  # time.monotonic() past which no more work is done for it
    arrival: float  # time.perf_counter() when the edge received it
    trace: bool = False  # send its RequestTrace with its Summary (the edge traces it)


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Stop:
    pass


class EngineStopped(Exception):
    """The engine is stopping or gone: a request handed to it now is refused (UNAVAILABLE)."""


@dataclass(frozen=True)
class ModelFacts:
    """What the edge knows of the served model (GetModelInfo, validation): the runtime's ModelSpec
    without its torch types, so that the edge unpickles it without importing torch or the model."""

    base: str  # hub id, folder or preset name
    dtype: str  # "float32", "float16", "bfloat16"
    device: str  # "cpu", "cuda:0"
    backend: str  # "eager" | "compile" | "aoti" | "onnx"
    loras: tuple[LoraRecord, ...]  # fused into the model, in order
    decoders: tuple[str, ...]  # ("vae",), or ("vae", "tiny_vae") with a tiny autoencoder
    default_decoder: str  # what a request's DECODER_UNSPECIFIED means
    scorer: ScorerRecord | None = None  # the candidate scorer (best-of-N), None without one
    adapters_supported: bool = False  # serves per-request adapters (issue 21: eager; not aoti, onnx, compile)

    @classmethod
    def of(cls, spec: ModelSpec) -> ModelFacts:
        return cls(base=spec.base, dtype=str(spec.dtype).removeprefix("torch."), device=str(spec.device),
                   backend=spec.backend, loras=tuple(spec.loras), decoders=tuple(spec.decoders),
                   default_decoder=spec.default_decoder, scorer=spec.scorer,
                   adapters_supported=spec.adapters_supported)


@dataclass(frozen=True)
class EngineInfo:
    """What the engine process tells the edge once it is ready. Made from the runtime's `spec`,
    which it keeps as its ModelFacts (`model`)."""

    spec: InitVar[ModelSpec]
    tokenizer: Any  # a transformers CLIPTokenizer: the edge tokenizes while validating
    graphs: int  # CUDA graphs captured before serving
    load_s: float
    threads: int  # torch CPU threads of the engine process
    io_cpus: tuple[int, ...] = ()  # where the edge should run (CPU pinning), () for anywhere
    compute_cpus: tuple[int, ...] = ()  # where the engine process runs
    jpeg_encoder: str = "host"  # "gpu" | "host": where this engine encodes JPEG (GetModelInfo)
    backend: BackendState = BackendState(())  # at Ready; later changes come as metric updates
    adapters: tuple[AdapterRecord, ...] = ()  # per-request adapters loaded at start (serve --adapter)
    model: ModelFacts = field(init=False)

    def __post_init__(self, spec: ModelSpec) -> None:
        object.__setattr__(self, "model", ModelFacts.of(spec))


@dataclass(frozen=True)
class Ready:
    info: EngineInfo


@dataclass(frozen=True, init=False)
class LoadFailed:
    """The model did not load (or warm up). Only its text crosses the pipe: unpickling the exception
    itself would import the module that defines its class (the loader's, and with it torch) into
    the edge. Our own errors' messages say it all; another's keeps its class name."""

    message: str  # whole, on one line for the serve CLI

    def __init__(self, error: BaseException | str) -> None:
        if isinstance(error, BaseException):
            text = " ".join(str(error).split()) or type(error).__name__
            ours = type(error).__module__.startswith("lcmserve")
            error = text if ours else f"{type(error).__name__}: {text}"
        object.__setattr__(self, "message", error)


@dataclass(frozen=True)
class Events:
    events: tuple[tuple[int, Event], ...] = ()  # (rid, event), each request's in order
    metrics: tuple[MetricUpdate, ...] = field(default=())


@dataclass(frozen=True)
class LoopDied:
    reason: str


ToEngine = Submit | Cancel | Stop | LoadAdapter | UnloadAdapter
FromEngine = Ready | LoadFailed | Events | LoopDied | AdapterReply
