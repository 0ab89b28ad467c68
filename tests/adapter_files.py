"""LoRA files for the adapter tests (test_adapters_service.py, test_adapters_load.py), made once per module
with tests/synthetic.py's make_lora for the `tiny` preset's shapes, good ones and the kinds LoadAdapter refuses."""

from __future__ import annotations

import pathlib

ATTENTION_AND_CONV = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")  # Linear and kohya conv (LoCon) layers


def make_adapter_files(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """{kind: path}: `kohya_te` (kohya_ss, rank 4, UNet attention and conv layers plus the text encoder),
    `diffusers` (diffusers/PEFT, rank 4, UNet only), `kohya_b` (kohya, rank 2, another seed), `rank16`
    (over a --max-adapter-rank 8), `kohya_te_b` (kohya, rank 8, UNet attention and text encoder), `no_keys` (safetensors without a LoRA key), `other_base` (kohya keys
    of modules this model does not have), `garbage` (not a safetensors file)."""
    import torch
    from safetensors.torch import save_file
    from synthetic import make_lora

    from lcmserve.export.loading import load_pipeline

    root.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline("tiny", dtype=torch.float32, device="cpu")
    files = {
        "kohya_te": make_lora(pipe, root / "cracks_kohya.safetensors", fmt="kohya", rank=4, seed=21,
                              targets=ATTENTION_AND_CONV, include_text_encoder=True),
        "diffusers": make_lora(pipe, root / "spalling_peft.safetensors", fmt="diffusers", rank=4, seed=22),
        "kohya_b": make_lora(pipe, root / "rust_kohya.safetensors", fmt="kohya", rank=2, seed=23),
        "rank16": make_lora(pipe, root / "big.safetensors", fmt="kohya", rank=16, seed=24),
        "kohya_te_b": make_lora(pipe, root / "efflorescence_kohya.safetensors", fmt="kohya", rank=8, seed=25,
                                include_text_encoder=True),
    }
    no_keys = root / "no_keys.safetensors"
    save_file({"text_model.embeddings.weight": torch.zeros(4, 4)}, str(no_keys), metadata={"format": "pt"})
    files["no_keys"] = no_keys
    other = root / "other_base.safetensors"
    save_file({"lora_unet_mid_block_attentions_7_proj_in.lora_down.weight": torch.ones(4, 4096),
               "lora_unet_mid_block_attentions_7_proj_in.lora_up.weight": torch.ones(4096, 4),
               "lora_unet_mid_block_attentions_7_proj_in.alpha": torch.tensor(4.0)}, str(other),
              metadata={"format": "pt"})
    files["other_base"] = other
    garbage = root / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file\n" * 8)
    files["garbage"] = garbage
    return files
