"""lcmserve client SDK: typed sync and asyncio clients of an lcmserve server.

    from lcmserve import Client

    with Client("127.0.0.1:50051") as client:
        result = client.generate("a photo of a cracked concrete wall", seed=7)
        result.images[0].save("wall.jpg")

The options of a request (steps, size, seed, formats...) are keyword arguments of ``generate``
and ``stream``, or one ``GenerateOptions`` value given after the prompt (see ``options``).

Needs grpcio and protobuf only; Pillow and numpy are imported only by the methods that decode
pictures (``to_pil``, ``to_numpy``).
"""

from importlib.metadata import PackageNotFoundError, version

from .aio import AsyncClient
from .client import Client
from .errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    LcmServeError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ProtocolError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
    from_rpc_error,
)
from .options import GenerateFields, GenerateOptions
from .types import (
    AdapterInfo,
    AdapterInput,
    AdapterList,
    Candidate,
    GenerateEvent,
    GenerateResult,
    Image,
    Latents,
    Limits,
    LoraInfo,
    ModelInfo,
    OutputFormat,
    Picture,
    PreviewMode,
    ScorerInfo,
    StepEvent,
    Summary,
    Timings,
)

try:
    __version__ = version("lcmserve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

__all__ = [
    "AbortedError",
    "AdapterInfo",
    "AdapterInput",
    "AdapterList",
    "AlreadyExistsError",
    "AsyncClient",
    "Candidate",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "FieldViolation",
    "GenerateEvent",
    "GenerateFields",
    "GenerateOptions",
    "GenerateResult",
    "Image",
    "InternalError",
    "InvalidArgumentError",
    "Latents",
    "LcmServeError",
    "Limits",
    "LoraInfo",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "OutputFormat",
    "PermissionDeniedError",
    "Picture",
    "PreviewMode",
    "ProtocolError",
    "ResourceExhaustedError",
    "ScorerInfo",
    "StepEvent",
    "Summary",
    "Timings",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
    "__version__",
    "from_rpc_error",
]
