"""Compile a fused pipeline for one machine: `compiled/<backend>/` of an export artifact.

`compile_artifact` is called by `lcmserve export --backend aoti|compile|onnx` on the pipeline whose
model/ folder it saves (LoRAs already fused), and returns the manifest's typed `compiled` entry
(artifact.py). The server side (what each backend serves, how an artifact for another machine is
refused) is server/model/compiled.py and server/model/loader.py; docs/backends.md has the reasons and measured times.

    aoti     torch.export of four adapters (UNet step, VAE decode and encode, text encode), plus the tiny
             autoencoder's decoder when the artifact has tiny_vae/ (written before this runs), dynamic
             batch (1..63) and dynamic latent sides, each compiled by AOTInductor into a `.pt2` package.
    compile  torch.compile of the UNet and VAE decode, plus the tiny autoencoder's decoder when the
             artifact has tiny_vae/ (at the VAE decoder's warm shapes), run once per warm shape so
             inductor compiles them; the compile caches are saved with
             `torch.compiler.save_cache_artifacts()`. The VAE encoder and text encoder stay eager there.
    onnx     `torch.onnx.export(..., dynamo=True)` of the same adapters, same dynamic dims. We export
             with PyTorch's own exporter rather than optimum: optimum-onnx (where optimum's ONNX code
             lives now) requires transformers < 4.58 and conflicts with the transformers 5 we run.

Modules are deep-copied before rewriting (fused QKV adds weights, channels_last changes strides):
the pipeline handed in is saved to model/ afterwards and must stay a plain diffusers model.
"""

from __future__ import annotations

import copy
import logging
import math
import platform
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lcmserve.export.adapters import (
    TextEncode,
    TinyVaeDecode,
    UNetStep,
    VaeDecode,
    VaeEncode,
    apply_optimizations,
    compile_parts,
    compile_settings,
    compile_tiny_vae_decoder,
    copy_cpp_kernels,
    inductor_cache_dir,
    optimizations_for,
    warm_compiled,
    warm_decoder,
)
from lcmserve.export.artifact import (
    COMPILED_BACKENDS,
    COMPILED_DIR,
    ENTRY_TYPES,
    IMAGE_SIDE_RANGE,
    IO_NAMES,
    MAX_BATCH,
    PARTS,
    TINY_VAE_DIR,
    CompiledEntry,
    Served,
    device_arch,
    device_name,
    onnxruntime_version,
)
from lcmserve.export.pipeline import SDPipeline, as_module
from lcmserve.export.quiet import onnx_export_quietly, quiet_libraries
from lcmserve.export.unet_call import UNetCall

log = logging.getLogger("lcmserve.export.compile")

# Max |compiled - eager| at the example shape above which the export fails: a miscompile, not rounding.
# Pixels are in [-1, 1], so 2/255 of the 0..255 range is 4/255 there.
PARITY_LIMIT = {torch.float32: 4 / 255, torch.float16: 0.1, torch.bfloat16: 0.25}


def compile_artifact(
    pipe: SDPipeline,
    out_dir: Path,
    *,
    backend: str,
    device: str,
    dtype: torch.dtype,
    resolutions: Sequence[tuple[int, int]] = (),
    warm_batches: Sequence[int] = (1, 2, MAX_BATCH),
    vae_warm_batches: Sequence[int] = (1, 2, 8),
) -> CompiledEntry:
    """Write `out_dir/compiled/<backend>/` for `pipe` (fused, on `device` in `dtype`).

    Returns the manifest's `compiled[backend]` entry (an AotiEntry, CompileEntry or OnnxEntry): the machine it was
    made for (device, device_arch, torch / onnxruntime versions), the files (relative to `out_dir`),
    the exported input shapes and dynamic dims, what is served, and the export time of each step.
    `resolutions` ((height, width) in pixels; default: the model's nominal size), `warm_batches` (UNet)
    and `vae_warm_batches` are the shapes the `compile` backend runs at export, so a server start finds
    them in the cache: batch 1 gets its own graph, larger batches share dynamic-batch graphs, which
    guards may split (tiny's UNet on the CPU: 2..15 and 16..63), hence a warm batch at each end. The
    VAE default stops at 8, the engine's largest decode batch.
    """
    if backend not in COMPILED_BACKENDS:
        raise ValueError(f"backend {backend!r}: compiled backends are {', '.join(COMPILED_BACKENDS)}")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    out_dir = Path(out_dir)
    dest = out_dir / COMPILED_DIR / backend
    dest.mkdir(parents=True, exist_ok=True)
    shapes = _model_shapes(pipe)
    start = time.perf_counter()
    info: dict[str, Any] = {  # the fields of the entry, filled in by the backend's exporter
        "device": dev.type,
        "device_arch": device_arch(dev),
        "device_name": device_name(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "optimizations": optimizations_for(dev),
    }
    # The artifact's tiny autoencoder (export saves tiny_vae/ before compiling), compiled beside the VAE.
    tiny = _load_tiny_vae(out_dir, dev, dtype, shapes)
    with torch.no_grad():
        if backend == "aoti":
            info.update(_export_aoti(pipe, dest, dev, dtype, shapes, tiny))
        elif backend == "onnx":
            if dtype == torch.bfloat16:
                raise ValueError("--backend onnx --dtype bfloat16: ONNX Runtime has few bfloat16 kernels; "
                                 "export with --dtype float16 (GPU) or float32 (CPU)")
            info["onnxruntime"] = onnxruntime_version()
            info.update(_export_onnx(pipe, dest, dev, dtype, shapes, tiny))
        else:
            sizes = list(resolutions) or [(shapes["default_side"], shapes["default_side"])]
            batches = {"unet": tuple(warm_batches), "vae_decoder": tuple(vae_warm_batches)}
            if tiny is not None:  # the tiny decoder decodes what the VAE does: the same warm shapes
                batches["tiny_vae_decoder"] = tuple(vae_warm_batches)
            info.update(_export_compile(pipe, dest, dev, dtype, shapes, sizes, batches, tiny))
    info["files"] = {part: str((dest / name).relative_to(out_dir)) for part, name in info["files"].items()}
    info["export_seconds"]["total"] = round(time.perf_counter() - start, 1)
    log.info("compiled %s for %s (%s) in %.1f s: %s", backend, info["device_arch"], info["device_name"],
             info["export_seconds"]["total"], info["export_seconds"])
    return ENTRY_TYPES[backend](**info)


# --- shapes -------------------------------------------------------------------------------------------


def _model_shapes(pipe: SDPipeline) -> dict[str, int]:
    """Sizes the exports need, read off the pipeline."""
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    # The UNet halves the latent (num_upsamplers) times; sides that are not a multiple of
    # 2**num_upsamplers take another code path (forward_upsample_size) that export cannot keep dynamic.
    multiple = 2 ** int(pipe.unet.num_upsamplers)
    lo = math.ceil(IMAGE_SIDE_RANGE[0] / vae_scale)
    hi = IMAGE_SIDE_RANGE[1] // vae_scale
    # At least 2 multiples: a side of 1 at the UNet's bottom gets specialized by export (0/1 rule).
    k_lo, k_hi = max(2, math.ceil(lo / multiple)), max(2, hi // multiple)
    default_latent = int(pipe.unet.config.sample_size)
    k_example = min(max(default_latent // multiple, k_lo), k_hi)
    return {
        "vae_scale": vae_scale,
        "latent_channels": int(pipe.unet.config.in_channels),
        "text_len": int(pipe.tokenizer.model_max_length),
        "text_dim": int(pipe.text_encoder.config.hidden_size),
        "multiple": multiple,
        "k_lo": k_lo,
        "k_hi": k_hi,
        "k_example": k_example,
        "vae_lo": lo,
        "vae_hi": hi,
        "default_side": default_latent * vae_scale,
    }


def _load_tiny_vae(out_dir: Path, dev: torch.device, dtype: torch.dtype,
                   s: dict[str, int]) -> torch.nn.Module | None:
    """out_dir/tiny_vae/'s AutoencoderTiny on `dev` in `dtype`, or None when the artifact has none."""
    folder = out_dir / TINY_VAE_DIR
    if not (folder / "config.json").is_file():
        return None
    from lcmserve.export.tiny_vae import load_tiny_vae

    module, _ = load_tiny_vae(str(folder), dtype=dtype, device=dev, latent_channels=s["latent_channels"],
                              vae_scale_factor=s["vae_scale"])
    return module


def _dynamic_specs(s: dict[str, int]) -> tuple[dict[str, Any], dict[str, Any], Served]:
    """torch.export dynamic_shapes per part, and the same in JSON for the manifest."""
    from torch.export import Dim

    batch = Dim("batch", min=1, max=MAX_BATCH)
    m = s["multiple"]
    unet_h = m * Dim("unet_h_blocks", min=s["k_lo"], max=s["k_hi"])
    unet_w = m * Dim("unet_w_blocks", min=s["k_lo"], max=s["k_hi"])
    vae_h = Dim("vae_h", min=s["vae_lo"], max=s["vae_hi"])
    vae_w = Dim("vae_w", min=s["vae_lo"], max=s["vae_hi"])
    unet = {"latents": {0: batch, 2: unet_h, 3: unet_w}, "timesteps": {0: batch}, "text": {0: batch}}
    specs: dict[str, Any] = {
        "text_encoder": {"input_ids": {0: batch}},
        # UNetStep takes the call's tensors as *inputs: one argument, a tuple in UNetCall's order.
        "unet": (tuple(unet[name] for name in IO_NAMES["unet"][0]),),
        "vae_decoder": {"latents": {0: batch, 2: vae_h, 3: vae_w}},
        "vae_encoder": {"pixels": {0: batch, 2: s["vae_scale"] * Dim("vae_h", min=s["vae_lo"], max=s["vae_hi"]),
                                   3: s["vae_scale"] * Dim("vae_w", min=s["vae_lo"], max=s["vae_hi"])}},
        "tiny_vae_decoder": {"latents": {0: batch, 2: vae_h, 3: vae_w}},  # the VAE decoder's ranges
    }
    c, n, d = s["latent_channels"], s["text_len"], s["text_dim"]
    shapes_json = {
        "text_encoder": {"input_ids": ["batch", n], "hidden": ["batch", n, d]},
        "unet": {"latents": ["batch", c, f"{m}*unet_h_blocks", f"{m}*unet_w_blocks"], "timesteps": ["batch"],
                 "text": ["batch", n, d], "noise": ["batch", c, f"{m}*unet_h_blocks", f"{m}*unet_w_blocks"]},
        "vae_decoder": {"latents": ["batch", c, "vae_h", "vae_w"],
                        "pixels": ["batch", 3, f"{s['vae_scale']}*vae_h", f"{s['vae_scale']}*vae_w"]},
        "vae_encoder": {"pixels": ["batch", 3, f"{s['vae_scale']}*vae_h", f"{s['vae_scale']}*vae_w"],
                        "moments": ["batch", 2 * c, "vae_h", "vae_w"]},
        "tiny_vae_decoder": {"latents": ["batch", c, "vae_h", "vae_w"],
                             "pixels": ["batch", 3, f"{s['vae_scale']}*vae_h", f"{s['vae_scale']}*vae_w"]},
        "dims": {"batch": [1, MAX_BATCH], "unet_h_blocks": [s["k_lo"], s["k_hi"]],
                 "unet_w_blocks": [s["k_lo"], s["k_hi"]], "vae_h": [s["vae_lo"], s["vae_hi"]],
                 "vae_w": [s["vae_lo"], s["vae_hi"]]},
    }
    served = Served(  # larger batches run in chunks
        batch_range=(1, MAX_BATCH),
        unet_latent_multiple=m,
        unet_latent_range=(m * s["k_lo"], m * s["k_hi"]),
        vae_latent_range=(s["vae_lo"], s["vae_hi"]),
    )
    return specs, shapes_json, served


def _example_inputs(s: dict[str, int], dev: torch.device, dtype: torch.dtype, batch: int = 2,
                    latent_hw: tuple[int, int] | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """Batch 2 and sides of several UNet multiples by default: a 1 would be specialized by export."""
    gen = torch.Generator().manual_seed(0)
    h, w = latent_hw or (s["multiple"] * s["k_example"],) * 2
    c, n, d = s["latent_channels"], s["text_len"], s["text_dim"]
    timesteps = (999 - 260 * torch.arange(batch)) % 1000  # LCM's 4-step schedule: 999, 739, 479, 219
    return {
        "text_encoder": (torch.randint(0, 256, (batch, n), generator=gen).to(dev),),
        "unet": UNetCall(torch.randn(batch, c, h, w, generator=gen).to(dev, dtype), timesteps.to(dev),
                         torch.randn(batch, n, d, generator=gen).to(dev, dtype)).positional(),
        "vae_decoder": (torch.randn(batch, c, h, w, generator=gen).to(dev, dtype),),
        "vae_encoder": (torch.rand(batch, 3, h * s["vae_scale"], w * s["vae_scale"], generator=gen).mul(2).sub(1)
                        .to(dev, dtype),),  # pixels in [-1, 1]
        "tiny_vae_decoder": (torch.randn(batch, c, h, w, generator=gen).to(dev, dtype),),  # latents / 1.0
    }


def _adapters(pipe: SDPipeline, dev: torch.device, dtype: torch.dtype, optimizations: Sequence[str],
              tiny: torch.nn.Module | None = None) -> dict[str, torch.nn.Module]:
    """Rewritten copies of the four parts (five with a tiny autoencoder) behind plain-tensor adapters
    (the pipeline and `tiny` are untouched)."""
    text = _copy_to(pipe.text_encoder, dev, dtype)
    unet = apply_optimizations(_copy_to(pipe.unet, dev, dtype), tuple(optimizations))
    vae = apply_optimizations(_copy_to(pipe.vae, dev, dtype), tuple(optimizations))
    adapters: dict[str, torch.nn.Module] = {
        "text_encoder": TextEncode(text).eval(), "unet": UNetStep(unet).eval(),
        "vae_decoder": VaeDecode(vae).eval(), "vae_encoder": VaeEncode(vae).eval()}
    if tiny is not None:
        tiny_copy = apply_optimizations(_copy_to(tiny, dev, dtype), tuple(optimizations))
        adapters["tiny_vae_decoder"] = TinyVaeDecode(tiny_copy).eval()
    return adapters


def _copy_to(part: object, dev: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A deep copy in eval mode on `dev` in `dtype` (cast only when needed: diffusers warns on every cast)."""
    module = as_module(copy.deepcopy(part)).eval()
    weight = next(module.parameters())
    if weight.dtype != dtype or weight.device != dev:
        module.to(dev, dtype)
    return module


def _references(pipe: SDPipeline, inputs: dict[str, tuple[torch.Tensor, ...]],
                tiny: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The unrewritten pipeline's (and tiny autoencoder's) outputs at the example inputs: what each
    compiled part must match."""
    eager: dict[str, torch.nn.Module] = {
        "text_encoder": TextEncode(as_module(pipe.text_encoder)), "unet": UNetStep(as_module(pipe.unet)),
        "vae_decoder": VaeDecode(as_module(pipe.vae)), "vae_encoder": VaeEncode(as_module(pipe.vae))}
    if tiny is not None:
        eager["tiny_vae_decoder"] = TinyVaeDecode(tiny)
    return {part: eager[part](*inputs[part]) for part in eager}


def _check_parity(part: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    diff = float((got.float() - want.float()).abs().max())
    if not math.isfinite(diff) or diff > PARITY_LIMIT.get(dtype, 0.1):
        raise RuntimeError(f"compiled {part} differs from eager by {diff:.3g} at the example shape "
                           f"(limit {PARITY_LIMIT.get(dtype, 0.1):.3g} for {dtype}): not exported")
    return diff


# --- aoti ---------------------------------------------------------------------------------------------


def _export_aoti(pipe: SDPipeline, dest: Path, dev: torch.device, dtype: torch.dtype,
                 s: dict[str, int], tiny: torch.nn.Module | None = None) -> dict[str, Any]:
    specs, shapes_json, served = _dynamic_specs(s)
    inputs = _example_inputs(s, dev, dtype)
    references = _references(pipe, inputs, tiny)
    adapters = _adapters(pipe, dev, dtype, optimizations_for(dev), tiny)
    seconds: dict[str, Any] = {}
    parity: dict[str, float] = {}
    files: dict[str, str] = {}
    for part, module in adapters.items():
        t0 = time.perf_counter()
        program = torch.export.export(module, inputs[part], dynamic_shapes=specs[part])
        t1 = time.perf_counter()
        package = dest / PARTS["aoti"][part]
        # AOTInductor writes its platform keys into the global `aot_inductor.metadata` dict; left there,
        # they change every later torch.compile cache key in this process (the compile backend's
        # cache would then never hit in a fresh server). A fresh dict for the call keeps it local.
        with torch._inductor.config.patch({"aot_inductor.metadata": {}}):
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
        t2 = time.perf_counter()
        del program
        loaded = torch._inductor.aoti_load_package(str(package), device_index=dev.index if dev.index is not None else -1)
        parity[part] = _check_parity(part, loaded(*inputs[part]), references[part], dtype)
        seconds[part] = {"export": round(t1 - t0, 1), "compile": round(t2 - t1, 1)}
        files[part] = PARTS["aoti"][part]
        log.info("aoti %s: export %.1f s, AOTInductor compile %.1f s, max |diff| %.2g", part, t1 - t0,
                 t2 - t1, parity[part])
    return {"files": files, "shapes": shapes_json, "served": served, "parity_max_abs_diff": parity,
            "export_seconds": seconds}


# --- onnx ---------------------------------------------------------------------------------------------


def _export_onnx(pipe: SDPipeline, dest: Path, dev: torch.device, dtype: torch.dtype,
                 s: dict[str, int], tiny: torch.nn.Module | None = None) -> dict[str, Any]:
    import onnxruntime as ort  # type: ignore[import-untyped]  # onnxruntime ships no type information

    quiet_libraries(progress_bars=True)  # torch.onnx's registry lines about torchvision ops
    specs, shapes_json, served = _dynamic_specs(s)
    inputs = _example_inputs(s, dev, dtype)
    references = _references(pipe, inputs, tiny)
    # ONNX Runtime runs its own kernels: layouts are its business, so no channels_last here.
    optimizations = [o for o in optimizations_for(dev) if o != "channels_last"]
    adapters = _adapters(pipe, dev, dtype, optimizations, tiny)
    seconds: dict[str, Any] = {}
    parity: dict[str, float | str] = {}
    files: dict[str, str] = {}
    for part, module in adapters.items():
        in_names, out_name = IO_NAMES[part]
        path = dest / PARTS["onnx"][part]
        t0 = time.perf_counter()
        with onnx_export_quietly():
            torch.onnx.export(module, inputs[part], str(path), dynamo=True, dynamic_shapes=specs[part],
                              input_names=list(in_names), output_names=[out_name], external_data=True,
                              optimize=True, verbose=False)
        t1 = time.perf_counter()
        parity[part] = _onnx_parity(ort, path, part, inputs[part], references[part], dtype)
        seconds[part] = {"export": round(t1 - t0, 1)}
        files[part] = PARTS["onnx"][part]
        if path.with_name(path.name + ".data").exists():
            files[part + "_data"] = path.name + ".data"
        log.info("onnx %s: export %.1f s, max |diff| %.2g", part, t1 - t0, parity[part])
    info = {"files": files, "shapes": shapes_json, "served": served, "parity_max_abs_diff": parity,
            "export_seconds": seconds, "optimizations": tuple(optimizations)}
    return info


def _onnx_parity(ort: Any, path: Path, part: str, inputs: tuple[torch.Tensor, ...], reference: torch.Tensor,
                 dtype: torch.dtype) -> float | str:
    """Run the ONNX file at the example inputs, on the CUDA provider when this onnxruntime has one
    (fp16 GPU exports), else on the CPU provider."""
    in_names, out_name = IO_NAMES[part]
    cuda = reference.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    feeds = {name: x.detach().cpu().numpy() for name, x in zip(in_names, inputs)}
    try:
        session = ort.InferenceSession(str(path), providers=providers)
        (got,) = session.run([out_name], feeds)
    except Exception as exc:  # an fp16 graph the CPU provider lacks kernels for: cannot check here
        if dtype == torch.float32:
            raise
        log.warning("onnx %s: parity not checked (%s has no kernel: %s)", part, providers[0], exc)
        return f"not checked: {type(exc).__name__}"
    return _check_parity(part, torch.from_numpy(got), reference.cpu(), dtype)


# --- compile ------------------------------------------------------------------------------------------


def _export_compile(pipe: SDPipeline, dest: Path, dev: torch.device, dtype: torch.dtype,
                    s: dict[str, int], resolutions: Sequence[tuple[int, int]],
                    warm_batches: dict[str, tuple[int, ...]],
                    tiny: torch.nn.Module | None = None) -> dict[str, Any]:
    """torch.compile the UNet, VAE decode and (with `tiny`, the artifact's AutoencoderTiny) the tiny
    decoder, warm each at warm_shapes[part] in an empty inductor cache, check parity, save the cache.
    warm_shapes["tiny_vae_decoder"] in the entry is what tells the server the cache holds it."""
    settings = compile_settings(dev)
    optimizations = optimizations_for(dev)
    f = s["vae_scale"]
    for h, w in resolutions:
        if h % f or w % f:
            raise ValueError(f"resolution {h}x{w}: sides must be multiples of {f} pixels")
    warm_shapes = {part: tuple((int(b), h // f, w // f) for h, w in resolutions for b in batches)
                   for part, batches in warm_batches.items()}
    unet, vae = _copy_to(pipe.unet, dev, dtype), _copy_to(pipe.vae, dev, dtype)
    # Parity at a warm shape both parts have (no new compile): batch 2 by default.
    common = [shape for shape in warm_shapes["unet"] if shape in warm_shapes["vae_decoder"]]
    if not common:
        raise ValueError(f"warm batches {warm_batches}: the UNet and VAE need one batch size in common")
    batch, h, w = common[min(1, len(common) - 1)]
    inputs = _example_inputs(s, dev, dtype, batch=batch, latent_hw=(h, w))
    references = _references(pipe, inputs, tiny)
    # An empty inductor cache for this compile: everything it builds is then collected from one place,
    # and the export never depends on what an earlier compile left in the user's cache.
    with tempfile.TemporaryDirectory(prefix="lcmserve-inductor-") as tmp, inductor_cache_dir(Path(tmp)):
        unet_c, vae_c = compile_parts(unet, vae, optimizations, settings)
        compiled = {"unet": unet_c, "vae_decoder": vae_c}
        if tiny is not None:
            compiled["tiny_vae_decoder"] = compile_tiny_vae_decoder(_copy_to(tiny, dev, dtype), optimizations,
                                                                    settings)
        t0 = time.perf_counter()
        warm_compiled(unet_c, vae_c, warm_shapes, device=dev, dtype=dtype, latent_channels=s["latent_channels"],
                      text_len=s["text_len"], text_dim=s["text_dim"])
        if tiny is not None:
            warm_decoder(compiled["tiny_vae_decoder"], warm_shapes["tiny_vae_decoder"], device=dev, dtype=dtype,
                         latent_channels=s["latent_channels"])
        t1 = time.perf_counter()
        parity = {}
        with torch.inference_mode():
            for part, fn in compiled.items():  # at a warm shape of each: no new compile
                parity[part] = _check_parity(part, fn(*inputs[part]), references[part], dtype)
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            raise RuntimeError("torch.compiler.save_cache_artifacts() returned nothing: no compile cache to save")
        data, _ = saved
        (dest / PARTS["compile"]["cache"]).write_bytes(data)
        kernels = copy_cpp_kernels(Path(tmp), dest / PARTS["compile"]["cpp_kernels"])
    (dest / PARTS["compile"]["cpp_kernels"]).mkdir(exist_ok=True)
    log.info("compile: warmed %s in %.1f s; cache %.1f MB, %d C++ kernels", warm_shapes, t1 - t0,
             len(data) / 1e6, kernels)
    return {
        "files": dict(PARTS["compile"]),
        "torch_compile": settings,
        "optimizations": tuple(optimizations),
        "warm_shapes": warm_shapes,  # per part, (batch, latent_h, latent_w)
        "served": Served(batch_range=(1, None), any_shape=True),
        "parity_max_abs_diff": parity,
        "cache_bytes": len(data),
        "cpp_kernels": kernels,
        "export_seconds": {"warm_compile": round(t1 - t0, 1)},
    }
