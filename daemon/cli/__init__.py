"""The `mlx-serve` command line: one module per command group; `main.py` builds the parser."""
