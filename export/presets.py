"""Built-in models: `tiny` (seconds on a CPU) and `sd15-random` (SD v1.5 shapes, random weights).

Both are ordinary diffusers folders once built (`preset_dir(name)`), loadable by
`StableDiffusionPipeline.from_pretrained(dir)`. They need no network: the CLIP tokenizer is a small
byte-level BPE written here (every byte has a token, so any prompt tokenizes), and the weights come
from our own seeded initialiser, not from the libraries' init code, so a preset has the same weights
on every machine and with any torch / diffusers / transformers version (numpy's PCG64 stream + plain
float64 arithmetic; `weights_sha256` checks it).

Built once per cache: `$LCMSERVE_CACHE/presets/<name>-v<N>` (default `~/.cache/lcmserve`), written to
a temp folder beside it and renamed into place, so two processes building at once both end up with
one complete folder. Bump `PRESET_VERSION` when anything below changes what a preset contains.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from lcmserve.export.errors import ModelNotFoundError

if TYPE_CHECKING:  # heavy imports are deferred: importing this module must stay cheap
    import torch

    from lcmserve.export.pipeline import SDPipeline

PRESETS: tuple[str, ...] = ("tiny", "sd15-random")
PRESET_VERSION = 1
INIT_SEED = 20240601  # the one seed every preset's weights derive from

# SD v1.5's scheduler config (its scheduler/scheduler_config.json, PNDM there), as LCMScheduler reads it.
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "original_inference_steps": 50,
}


@dataclass(frozen=True)
class PresetSpec:
    """Shapes of one preset. Component configs are diffusers / transformers constructor kwargs."""

    name: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    # Multiplies the default init bound of every Linear/Conv weight (1 = PyTorch's default
    # kaiming_uniform(a=sqrt(5)) bound 1/sqrt(fan_in)).
    weight_gain: float = 1.0
    # Extra factor for the weights of UNet modules whose name ends with the key.
    unet_gain: dict[str, float] = field(default_factory=dict)
    # The preset's tiny autoencoder (diffusers' AutoencoderTiny kwargs; export/tiny_vae.py builds it),
    # and the init gain of its weights.
    tiny_vae: dict[str, Any] = field(default_factory=dict)
    tiny_vae_gain: float = 1.0


_TINY = PresetSpec(
    name="tiny",
    unet=dict(
        sample_size=8,  # nominal (64 px); any latent size works
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
    vae=dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 16, 16),  # 4 blocks: 8x downscale, as SD's VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
    ),
    text_encoder=dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=32,
    ),
    # Measured on 64x64, 4 steps: gain 1 gives pixel std 0.11 and prompts that barely matter (mean
    # |diff| 0.003 between two prompts); gain 1.5 plus 4x on the cross-attention keys/values gives
    # std 0.16, 1% saturated pixels, and a visible prompt effect (mean |diff| 0.04).
    weight_gain=1.5,
    unet_gain={"attn2.to_k": 4.0, "attn2.to_v": 4.0},
    tiny_vae=dict(  # TAESD's structure (4 blocks: 8x), 8 channels and one block each
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1),
    ),
    tiny_vae_gain=2.0,
)

_SD15_RANDOM = PresetSpec(
    name="sd15-random",
    unet=dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    vae=dict(
        sample_size=512,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        norm_num_groups=32,
    ),
    tiny_vae=dict(  # madebyollin/taesd's config.json (diffusers' AutoencoderTiny defaults, spelt out)
        encoder_block_out_channels=(64, 64, 64, 64), decoder_block_out_channels=(64, 64, 64, 64),
        num_encoder_blocks=(1, 3, 3, 3), num_decoder_blocks=(3, 3, 3, 1), latent_magnitude=3, latent_shift=0.5,
        scaling_factor=1.0,
    ),
    text_encoder=dict(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
    ),
)

_SPECS: dict[str, PresetSpec] = {s.name: s for s in (_TINY, _SD15_RANDOM)}


class UnknownPresetError(ModelNotFoundError):
    pass


def preset_spec(name: str) -> PresetSpec:
    try:
        return _SPECS[name]
    except KeyError:
        raise UnknownPresetError(f"unknown preset {name!r}: presets are {', '.join(PRESETS)}") from None


# --- tokenizer -------------------------------------------------------------------------------------

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# Words the BPE merges into single tokens (the rest falls back to one token per byte): enough to make
# the merges table non-trivial and typical prompts short.
_MERGED_WORDS = (
    "a", "an", "the", "of", "in", "on", "and", "with", "photo", "image", "picture", "high", "quality",
    "detailed", "crack", "cracks", "concrete", "wall", "surface", "cat", "dog", "city", "night", "red",
)  # fmt: skip


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to U+0100...

    So every byte string is a string of these 256 visible characters, and a vocabulary holding all
    256 (and their `</w>` word-final forms) can tokenize any text without an unknown token.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tokenizer_files() -> tuple[dict[str, int], list[str]]:
    """(vocab.json content, merges.txt lines): CLIP's layout, 256 bytes, 256 word-final bytes, merges,
    then `<|startoftext|>` and `<|endoftext|>` last."""
    alphabet = list(_byte_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    known = set(tokens)
    for word in _MERGED_WORDS:
        # Build the word left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>".
        piece = word[0]
        for i, ch in enumerate(word[1:], start=1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merged = piece + right
            if merged not in known:
                merges.append(f"{piece} {right}")
                tokens.append(merged)
                known.add(merged)
            piece = merged
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(folder: Path) -> Any:
    """Write vocab.json + merges.txt into `folder` and return the `CLIPTokenizer` loaded from them."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(
        vocab=str(folder / "vocab.json"),
        merges=str(folder / "merges.txt"),
        model_max_length=77,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=EOS,
    )


# --- weights ---------------------------------------------------------------------------------------


def _uniform(key: str, shape: tuple[int, ...], bound: float) -> Any:
    """uniform(-bound, bound) in float64 from a PCG64 stream seeded by (INIT_SEED, key)."""
    import numpy as np

    rng = np.random.Generator(np.random.PCG64([INIT_SEED, zlib.crc32(key.encode())]))
    return (rng.random(shape) * 2.0 - 1.0) * bound


def init_weights(
    component: str, model: torch.nn.Module, gain: float, gain_by_suffix: dict[str, float] | None = None
) -> None:
    """Overwrite every parameter of `model` deterministically, independent of library init code.

    Linear / Conv: weight ~ U(+-gain/sqrt(fan_in)), bias ~ U(+-1/sqrt(fan_in)) (PyTorch's default
    bounds when gain = 1); norms: weight 1, bias 0; embeddings: U(+-sqrt(3)*0.02) (std 0.02, as CLIP).
    `gain_by_suffix` multiplies the weight bound of modules whose name ends with a key.
    Each tensor draws from its own stream keyed by "component.param_name", so adding a module does
    not shift the others.
    """
    import torch

    done: set[str] = set()
    with torch.no_grad():
        for mod_name, module in model.named_modules():
            params = dict(module.named_parameters(recurse=False))
            if not params:
                continue
            for p_name, p in params.items():
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                key = f"{component}.{full}"
                if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                    value: Any = 1.0 if p_name == "weight" else 0.0
                    p.fill_(value)
                    done.add(full)
                    continue
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    w = module.weight
                    fan_in = w.shape[1] * (w[0, 0].numel() if w.dim() > 2 else 1)
                    w_gain = gain
                    for suffix, extra in (gain_by_suffix or {}).items():
                        if mod_name.endswith(suffix):
                            w_gain *= extra
                    bound = (w_gain if p_name == "weight" else 1.0) / fan_in**0.5
                else:  # embeddings (token, position), and anything else with weights
                    bound = 0.02 * 3**0.5
                p.copy_(torch.from_numpy(_uniform(key, tuple(p.shape), bound)).to(p.dtype))
                done.add(full)
    missing = {n for n, _ in model.named_parameters()} - done
    if missing:  # a parameter no module owns directly (shared or tied): refuse a silent half-init
        raise RuntimeError(f"preset init left parameters untouched: {sorted(missing)[:5]}")


def weights_sha256(pipe: SDPipeline) -> str:
    """sha256 over the names, shapes, dtypes and bytes of every UNet / VAE / text-encoder parameter
    (parameters only: buffers such as CLIP's position ids differ between library versions)."""
    import torch

    h = hashlib.sha256()
    for comp in ("unet", "vae", "text_encoder"):
        for name, t in sorted(getattr(pipe, comp).named_parameters()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{comp}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- building --------------------------------------------------------------------------------------


def build_preset(name: str, tokenizer_folder: Path | None = None) -> SDPipeline:
    """Build the preset in memory (float32, CPU). `tokenizer_folder` gets vocab.json + merges.txt
    (a temp folder when None)."""
    from diffusers import AutoencoderKL, LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lcmserve.export.pipeline import SDPipeline, as_module

    spec = preset_spec(name)
    if tokenizer_folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer = write_tokenizer(Path(tmp))
    else:
        tokenizer = write_tokenizer(tokenizer_folder)

    # diffusers' constructors are untyped to mypy (its config decorators): narrowed with as_module.
    unet = as_module(UNet2DConditionModel(**spec.unet))  # type: ignore[no-untyped-call]
    vae = as_module(AutoencoderKL(**spec.vae))  # type: ignore[no-untyped-call]
    text_cfg = dict(spec.text_encoder)
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            **text_cfg,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    for comp, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        init_weights(comp, model, spec.weight_gain, spec.unet_gain if comp == "unet" else None)
        model.eval()
    scheduler = LCMScheduler(**SD15_SCHEDULER_CONFIG)  # type: ignore[no-untyped-call]
    pipe = StableDiffusionPipeline(  # type: ignore[no-untyped-call]
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return cast(SDPipeline, pipe)


def cache_root() -> Path:
    """`$LCMSERVE_CACHE`, else `~/.cache/lcmserve`."""
    env = os.environ.get("LCMSERVE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lcmserve"


def preset_dir(name: str) -> Path:
    """The preset as a diffusers folder, built and saved on first use, reused afterwards."""
    preset_spec(name)  # unknown name -> UnknownPresetError before touching the disk
    final = cache_root() / "presets" / f"{name}-v{PRESET_VERSION}"
    if (final / "model_index.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        pipe = build_preset(name, tokenizer_folder=tmp / "tokenizer")
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "lcmserve_preset.json").write_text(
            json.dumps({"name": name, "version": PRESET_VERSION, "weights_sha256": weights_sha256(pipe)})
            + "\n"
        )
        try:
            os.rename(tmp, final)  # atomic; fails if another process got there first
        except OSError:
            if not (final / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
