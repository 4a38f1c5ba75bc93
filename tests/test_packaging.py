"""pyproject.toml installs every package and top-level module of the repository."""
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_and_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py") if p.parent.name != "tests"}
    modules = {p.stem for p in ROOT.glob("*.py")}
    assert set(config["packages"]) == packages, "pyproject.toml [tool.setuptools] packages"
    assert set(config["py-modules"]) == modules, "pyproject.toml [tool.setuptools] py-modules"
    # The tokenizer's vocabulary must travel with the wheel.
    for name in config["package-data"]["modules"]:
        assert (ROOT / "modules" / name).is_file()


def test_evaluation_does_not_import_training():
    # Evaluating a checkpoint needs no training code (what both use lives in dataloaders/util).
    code = "import sys, evaluation; print('training' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
