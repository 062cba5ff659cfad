"""The package as `pip install` builds it, and the README's drop-in layer example."""
import math
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_block(heading: str, lang: str) -> str:
    """The first ```lang block after the README heading `## heading`."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1]
    return re.search(rf"```{lang}\n(.*?)```", section, re.S)[1]


def test_the_wheel_takes_every_cprec_module():
    # setuptools' find takes the packages matching `include` whose folders all hold an __init__.py.
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["cprec*"]
    folders = {p.parent for p in (ROOT / "cprec").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"not in the wheel (no __init__.py): {missing}"


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
