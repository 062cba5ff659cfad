"""The package as `pip install` builds it, and the README's drop-in layer example."""
import math
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest
import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_block(heading: str, lang: str) -> str:
    """The first ```lang block after the README heading `## heading`."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S)[1]


def test_the_package_finds_every_cprec_module():
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(setuptools.find_packages(str(ROOT), include=find["include"]))
    with_code = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "cprec").rglob("*.py")}
    assert with_code <= packages, f"not in the wheel (no __init__.py?): {sorted(with_code - packages)}"


def test_the_readme_example_runs_as_written():
    scope: dict = {}
    exec(compile(readme_block("CpRec's layers in your own model", "python"), "README.md", "exec"), scope)
    assert math.isfinite(float(scope["loss"])) and scope["ids"].shape == (8, 20)


@pytest.mark.slow
def test_a_fresh_venv_installs_the_package_and_runs_the_example(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(ROOT)], check=True, cwd=tmp_path)
    code = readme_block("CpRec's layers in your own model", "python") + "\nimport cprec; print(cprec.__file__)\n"
    out = subprocess.run([venv / "bin" / "python", "-c", code], check=True, cwd=tmp_path,
                         capture_output=True, text=True).stdout
    assert str(venv) in out  # the installed package, not the checkout
