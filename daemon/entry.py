"""The `mlx-serve` entry point: `serve` runs on the C allocator, so model unloads give memory back.

CPython's own small-object allocator (pymalloc) returns a 1 MiB arena to the OS only when every
object in it is dead. Loading a model allocates tens of MB of short-lived Python objects (the
tokenizer's JSON, vocabularies, templates) among a few that outlive the model (caches in
transformers and mlx-lm), and those few pin their arenas: measured with SmolLM2 on MLX, every TTL
load/unload cycle left 3-5 MiB behind, without end. On the C allocator, freed objects go back to
malloc, which releases free pages wherever they are (release_memory calls malloc_trim on Linux):
the same cycles leave about 0.5 MiB. The allocator is chosen at interpreter start, so `serve`
re-executes itself once with the variable set, before anything else is imported; an explicit
PYTHONMALLOC from the user is kept. Other commands run as they are.
"""

from __future__ import annotations

import os
import sys

VARIABLE = "PYTHONMALLOC"


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        exec_with_c_allocator()
    from mlx_serve.daemon.cli.main import main as cli_main

    return cli_main()


def exec_with_c_allocator() -> None:
    """Replace this process (same pid, so launchd and systemd do not notice) unless already done."""
    if VARIABLE in os.environ:
        return
    env = dict(os.environ, **{VARIABLE: "malloc"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
