"""The onnx backend: ONNX files of the parts (text encoder, UNet, VAE decoder and encoder, tiny decoder
when the artifact has one) served by ONNX Runtime.

The CUDA execution provider with IO binding on a GPU (ORT reads and writes torch's device memory, on
torch's stream), the CPU provider otherwise (IO binding on host memory). Shapes outside what the
export holds fall back to eager as for aoti (compiled_common.py). Chosen in loader.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lcmserve.export.artifact import IO_NAMES, Manifest, OnnxEntry

from .compiled_common import CompiledRuntimeBase, batch_timesteps, chunked


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


class OnnxRuntime(CompiledRuntimeBase):
    """ONNX Runtime sessions, fed through IO binding. On CUDA ORT runs on torch's current stream;
    `run_with_iobinding` waits for its work before returning (a host sync), so these calls cannot sit
    inside a CUDA graph capture (`cuda_graph_capturable` False)."""

    backend = "onnx"
    graph_capturable = False

    def __init__(self, artifact_dir: Path, manifest: Manifest, entry: OnnxEntry, device: torch.device,
                 *, warmup: bool = True) -> None:
        import onnxruntime as ort

        super().__init__(artifact_dir, manifest, entry, device)
        providers = onnx_providers(device)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: the CPU provider warns about every fp16 cast
        if device.type == "cpu":
            # ORT's worker threads spin after each run by default; on a small CPU they then starve the
            # torch code between runs (eager fallbacks, the LCM step): measured about 60x slower eager UNet
            # calls on 2 cores right after ORT runs.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._sessions: dict[str, Any] = {part: ort.InferenceSession(str(artifact_dir / entry.files[part]), options, providers=providers)
                          for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "tiny_vae_decoder")
                          if part in entry.files}
        self._stream = torch.cuda.current_stream(device) if device.type == "cuda" else None

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
        for name, x in zip(in_names, inputs):
            binding.bind_input(name, kind, index, np.dtype(_ORT_TYPES[x.dtype]), tuple(x.shape), x.data_ptr())
        out = torch.empty(out_shape, dtype=out_dtype, device=self.device)
        binding.bind_output(out_name, kind, index, np.dtype(_ORT_TYPES[out_dtype]), out_shape, out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        def run(ids: torch.Tensor) -> torch.Tensor:
            shape = (ids.shape[0], ids.shape[1], self.spec.text_hidden_size)
            return self._run("text_encoder", (ids.to(torch.int64),), shape, self.dtype)

        return chunked(run, input_ids)

    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        timesteps = batch_timesteps(timesteps, latents.shape[0])
        if not self.unet_serves(latents):
            noise: torch.Tensor = self.eager_part("unet", tuple(latents.shape))(latents, timesteps, text)
            return noise

        def run(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return self._run("unet", (x, t, c), tuple(x.shape), self.dtype)

        return chunked(run, latents, timesteps, text)

    def vae_decode(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.vae_serves(latents):
            pixels: torch.Tensor = self.eager_part("vae_decoder", tuple(latents.shape))(latents)
            return pixels
        f = self.spec.vae_scale_factor

        def run(x: torch.Tensor) -> torch.Tensor:
            shape = (x.shape[0], 3, x.shape[2] * f, x.shape[3] * f)
            return self._run("vae_decoder", (x,), shape, self.dtype)

        return chunked(run, latents)

    def vae_encode(self, pixels: torch.Tensor) -> torch.Tensor:
        f = self.spec.vae_scale_factor
        if "vae_encoder" not in self._sessions or not self.vae_serves(pixels[:, :, ::f, ::f]):
            return super().vae_encode(pixels)  # eager, logged

        def run(x: torch.Tensor) -> torch.Tensor:
            shape = (x.shape[0], 2 * self.spec.latent_channels, x.shape[2] // f, x.shape[3] // f)
            return self._run("vae_encoder", (x,), shape, self.dtype)

        return chunked(run, pixels)

    def compiled_tiny_vae_decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if "tiny_vae_decoder" not in self._sessions:
            return None
        f = self.spec.vae_scale_factor

        def run(x: torch.Tensor) -> torch.Tensor:
            shape = (x.shape[0], 3, x.shape[2] * f, x.shape[3] * f)
            return self._run("tiny_vae_decoder", (x,), shape, self.dtype)

        return lambda latents: chunked(run, latents)
