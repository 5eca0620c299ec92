"""The README's install lines, run in a fresh virtualenv beside the project's own.

A fresh virtualenv with a full Airflow install costs minutes (hundreds of packages), so this
test builds the wheel exactly as the README says (``pip wheel --no-deps -w dist .``), creates
a fresh venv with the project venv's interpreter, and makes the project venv's packages (Airflow
and the providers, psycopg) visible to it through a ``.pth`` file, pointing at a view of the
project venv's site-packages (symbolic links) without the project's own editable install, whose
entry point Airflow would find too. Then it runs the README's
``pip install 'dist/airflow_copyman-...whl[airflow,openlineage]'`` with ``--no-index``: pip
still reads the wheel's metadata and resolves its requirements and extras, and finds them
satisfied, so nothing is downloaded and only the wheel lands in the fresh venv.

What this proves: the wheel holds the package, its ``py.typed`` and its provider entry point;
its requirements and extras resolve against the Airflow versions we support; and Airflow,
started from that venv, lists the provider from the wheel (not from the checkout). What it does
not: that pip can download and install Airflow itself on a fresh machine (that is Airflow's
install, and ``make venv`` does it for every CI run anyway).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_the_readme_install_lines_in_a_fresh_venv(tmp_path: Path) -> None:
    # A copy of what a clone holds: setuptools builds in the source tree, and a build/ left
    # there by an earlier build could slip stale modules into the wheel.
    checkout = tmp_path / "checkout"
    shutil.copytree(REPO / "airflow_copyman", checkout / "airflow_copyman",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, checkout / name)
    dist = checkout / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", dist, ".", cwd=checkout)
    [wheel] = dist.glob("airflow_copyman-*.whl")

    venv = tmp_path / "fresh"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                     cwd=tmp_path).strip())
    (site / "_project_venv.pth").write_text(f"{_dependencies_view(tmp_path / 'deps')}\n")

    _run(python, "-m", "pip", "install", "--no-index", "-q",
         f"{wheel}[airflow,openlineage]", cwd=tmp_path)

    installed = _run(python, "-c", "import airflow_copyman.hooks.copyman as m, "
                     "importlib.metadata as md; print(m.__file__); "
                     "print(md.distribution('airflow-copyman').locate_file(''))", cwd=tmp_path)
    assert all(Path(line).is_relative_to(site) for line in installed.split()), installed
    assert (site / "airflow_copyman" / "py.typed").exists()

    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path / "airflow")}
    out = _run(python, "-m", "airflow", "providers", "list", "-o", "json", cwd=tmp_path, env=env)
    providers = {p["package_name"]: p for p in json.loads(out[out.index("[") :])}
    assert providers["airflow-copyman"]["version"] == wheel.name.split("-")[1]
    assert "CopyManOperator" in providers["airflow-copyman"]["description"]


def _dependencies_view(view: Path) -> Path:
    """The project venv's site-packages, less this project's own install."""
    view.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if "airflow_copyman" not in entry.name:
            (view / entry.name).symlink_to(entry)
    return view
