"""pyproject.toml installs every package and top-level module of the repository; modules import one
another as packages (no sys.path edits, no test imports bench/), and evaluation needs no training code."""
import ast
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


def _repository_python_files() -> list:
    """The top-level modules and every file of the packages and tests (not .venv, data or outputs)."""
    folders = [p.parent for p in ROOT.glob("*/__init__.py")] + [ROOT / "tests"]
    return sorted({*ROOT.glob("*.py"), *(f for folder in folders for f in folder.rglob("*.py"))})


def _imported_modules(tree: ast.AST) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(str(node.args[0].value))
    return names


def _edits_sys_path(tree: ast.AST) -> bool:
    """A call on ``sys.path`` (insert, append, extend, ...) or an assignment to it."""
    def is_sys_path(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and is_sys_path(node.func.value):
            return True
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        if any(is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)) for t in targets):
            return True
    return False


def test_tests_import_no_bench_module():
    # bench/ holds measurements; what a test exercises lives in the package (tools/, synthetic/, ...).
    offenders = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        bench = sorted(m for m in _imported_modules(ast.parse(path.read_text(encoding="utf-8")))
                       if m == "bench" or m.startswith("bench."))
        if bench:
            offenders[str(path.relative_to(ROOT))] = bench
    assert offenders == {}, f"tests import bench/ modules (move what they use into the package): {offenders}"


def test_no_file_inserts_into_sys_path():
    # Entry points run as modules (`python -m bench.score_bench`) from the root or an installed checkout.
    offenders = [str(p.relative_to(ROOT)) for p in _repository_python_files()
                 if _edits_sys_path(ast.parse(p.read_text(encoding="utf-8")))]
    assert offenders == [], f"these files edit sys.path; run them with python -m instead: {offenders}"


def test_the_checks_above_see_what_they_look_for():
    seen = _imported_modules(ast.parse("import bench.demo\nfrom bench import x\nimportlib.import_module('bench.y')"))
    assert seen == {"bench.demo", "bench", "bench.y"}
    for code in ("sys.path.insert(0, ROOT)", "sys.path.append(ROOT)", "sys.path = [ROOT]", "sys.path[:0] = [ROOT]",
                 "sys.path += [ROOT]"):
        assert _edits_sys_path(ast.parse(code)), code
    assert not _edits_sys_path(ast.parse("print(sys.path, sys.modules)\nos.path.join(a, b)"))
