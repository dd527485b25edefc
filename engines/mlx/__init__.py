"""The MLX engine (mlx-lm): load, generation, continuous batching, prefix caches, prompt lookup."""
