"""The mlx-serve process: CLI, app, registry, reloader, auth, metrics."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mlx-serve")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
