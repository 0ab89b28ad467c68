"""lcmserve export: presets, model and LoRA loading, fusing, compiling (offline work)."""
