"""The onnx backend: ONNX files of the parts (text encoder, UNet, VAE decoder and encoder, tiny decoder
when the artifact has one) served by ONNX Runtime.

The CUDA execution provider with IO binding on a GPU (ORT reads and writes torch's device memory, on
torch's stream), the CPU provider otherwise (IO binding on host memory). Shapes outside what the
export holds run on the eager modules, as for aoti (parts.py). Chosen in loader.py.
"""

from __future__ import annotations

from typing import Any

import torch

from lcmserve.export.artifact import IO_NAMES, OnnxEntry

from .compiled_common import ArtifactModel, served_by_export
from .parts import Compiled


def onnx_providers(device: torch.device) -> list[Any]:
    """Execution providers for `device`, or an error saying what to install."""
    import onnxruntime as ort  # type: ignore[import-untyped]  # onnxruntime ships no type information

    if device.type != "cuda":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise RuntimeError(f"onnxruntime {ort.__version__} here has no CUDAExecutionProvider "
                           f"(providers: {ort.get_available_providers()}): install onnxruntime-gpu")
    options = {
        "device_id": device.index or 0,
        # ORT enqueues on torch's stream, so its kernels are ordered after the torch work that made
        # the inputs and before the torch work that reads the outputs.
        "user_compute_stream": str(torch.cuda.current_stream(device).cuda_stream),
        "cudnn_conv_algo_search": "EXHAUSTIVE",
    }
    return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]


_ORT_TYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64"}


class OnnxProvider:
    """ONNX Runtime sessions, fed through IO binding. On CUDA ORT runs on torch's current stream;
    `run_with_iobinding` waits for its work before returning (a host sync), so these calls cannot sit
    inside a CUDA graph capture (`graph_capturable` False)."""

    backend = "onnx"
    graph_capturable = False

    def __init__(self, model: ArtifactModel, entry: OnnxEntry) -> None:
        import onnxruntime as ort

        self.model = model
        self.entry = entry
        self.device = model.device
        providers = onnx_providers(model.device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the CPU provider warns about every fp16 cast
        if model.device.type == "cpu":
            # ORT's worker threads spin after each run by default; on a small CPU they then starve the
            # torch code between runs (eager fallbacks, the LCM step): measured about 60x slower eager UNet
            # calls on 2 cores right after ORT runs.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sessions: dict[str, Any] = {
            part: ort.InferenceSession(str(model.artifact_dir / entry.files[part]), options, providers=providers)
            for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tiny_vae_decoder")
            if part in entry.files}
        self._stream = torch.cuda.current_stream(model.device) if model.device.type == "cuda" else None

    def _run(self, part: str, inputs: tuple[torch.Tensor, ...], out_shape: tuple[int, ...],
             out_dtype: torch.dtype) -> torch.Tensor:
        """One session run with IO binding: ORT reads the torch inputs and writes a torch output in place
        (device memory on CUDA, host memory on the CPU), no copies either way."""
        import numpy as np

        session = self._sessions[part]
        in_names, out_name = IO_NAMES[part]
        kind, index = self.device.type, self.device.index or 0
        if kind == "cuda" and torch.cuda.current_stream(self.device) != self._stream:
            torch.cuda.current_stream(self.device).synchronize()  # ORT is bound to another stream
        binding = session.io_binding()
        inputs = tuple(x.contiguous() for x in inputs)  # keeps them alive until the run returns
        for name, x in zip(in_names, inputs, strict=True):
            binding.bind_input(name, kind, index, np.dtype(_ORT_TYPES[x.dtype]), tuple(x.shape), x.data_ptr())
        out = torch.empty(out_shape, dtype=out_dtype, device=self.device)
        binding.bind_output(out_name, kind, index, np.dtype(_ORT_TYPES[out_dtype]), out_shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    def _out_shape(self, part: str, x: torch.Tensor) -> tuple[int, ...]:
        """The output shape of `part` for its first input x."""
        dims, f = self.model.dims, self.model.dims.vae_scale_factor
        match part:
            case "text_encoder":
                return (x.shape[0], x.shape[1], dims.text_hidden_size)
            case "unet":
                return tuple(x.shape)
            case "vae_encoder":
                return (x.shape[0], 2 * dims.latent_channels, x.shape[2] // f, x.shape[3] // f)
        return (x.shape[0], 3, x.shape[2] * f, x.shape[3] * f)  # the decoders

    def _compiled(self, part: str) -> Compiled:
        def run(*inputs: torch.Tensor) -> torch.Tensor:
            return self._run(part, inputs, self._out_shape(part, inputs[0]), self.model.dtype)

        return served_by_export(run, self.entry.served, part, self.model.dims.vae_scale_factor)

    def compiled(self) -> dict[str, Compiled]:
        return {part: self._compiled(part) for part in self._sessions if part != "tiny_vae_decoder"}

    def tiny_vae_decoder(self) -> Compiled | None:
        return self._compiled("tiny_vae_decoder") if "tiny_vae_decoder" in self._sessions else None

    def details(self) -> dict[str, Any]:
        return {}
