"""The built wheel: one `mlx_serve` namespace, no top-level `daemon` (python-daemon owns that name),
and the package data the daemon needs at run time."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (path,) = out.glob("mlx_serve-*.whl")
    return path


def test_wheel_has_one_namespace_and_its_data(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top_level == {"mlx_serve"}
    for needed in (
        "mlx_serve/profiles/examples/default.toml",
        "mlx_serve/profiles/profile.schema.json",
        "mlx_serve/launchd/templates/launchagent.plist",
        "mlx_serve/daemon/assets/grafana-dashboard.json",
        "mlx_serve/daemon/assets/alert-rules.yml",
    ):
        assert needed in names, needed


def test_installed_wheel_imports_mlx_serve_but_not_daemon(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        timeout=300,
    )
    probe = (
        "import importlib.resources as r, importlib.util, mlx_serve.daemon;"  # no dependencies needed
        "print(mlx_serve.daemon.__file__);"
        "print(importlib.util.find_spec('daemon'));"
        "print('[models.' in r.files('mlx_serve.profiles').joinpath('examples/default.toml').read_text())"
    )
    result = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    module_file, daemon_spec, has_default = result.stdout.split()
    assert module_file.startswith(str(env_dir)) and module_file.endswith("mlx_serve/daemon/__init__.py")
    assert daemon_spec == "None"  # `import daemon` is free for python-daemon
    assert has_default == "True"
