"""Model files: where they come from (hub, LM Studio, packages, paths), GGUF reading and checks,
GGUF-to-MLX conversion, the on-disk cache."""
