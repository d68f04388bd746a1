"""The house rules, checked: imports point one way (import-linter's contracts in
pyproject.toml, the README's "Architecture" in words), no private name crosses a
module, and an import inside a function says why it is there."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
CHECKED = [ROOT / "src" / "hfedmoe", ROOT / "tests", ROOT / "benchmarks", ROOT / "scripts"]

# Private names of other libraries we must touch, each for a reason no public API covers.
THIRD_PARTY_PRIVATE = {
    "_actions": "argparse: a parser's actions have no public accessor (compare rewrites two help texts)",
    "_run_id": "Flower's TaskIdentity: the in-process grid stands in for a SuperLink's task ids",
    "_node_id": "Flower's TaskIdentity (as _run_id)",
    "_task_id": "Flower's TaskIdentity (as _run_id)",
    "_forward_hooks": "torch: no public way to list a module's hooks (registering them once)",
    "_forward_pre_hooks": "torch (as _forward_hooks)",
    "_post_accumulate_grad_hooks": "torch (as _forward_hooks), for a parameter's gradient hooks",
}


def python_files() -> list[Path]:
    return sorted(p for base in CHECKED for p in base.rglob("*.py"))


def run_lint_imports(*args: str) -> subprocess.CompletedProcess:
    if not LINT_IMPORTS.exists():
        pytest.fail(f"{LINT_IMPORTS} is missing: install the test extra (pip install -e '.[test]')")
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_the_import_layers_hold():
    result = run_lint_imports()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The contract is live: declaring the real graph upside down must break it."""
    config = tmp_path / "upside-down.toml"
    config.write_text('[tool.importlinter]\nroot_package = "hfedmoe"\n\n'
                      '[[tool.importlinter.contracts]]\nname = "core above methods (wrong on purpose)"\n'
                      'type = "layers"\nlayers = ["hfedmoe.core", "hfedmoe.methods"]\n')
    result = run_lint_imports("--config", str(config))
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]
    assert "hfedmoe.methods" in result.stdout


def private_uses(path: Path, root: Path = ROOT) -> list[str]:
    """``from m import _x``, ``obj._x`` (obj not self/cls/super()), ``getattr/setattr(obj, "_x")``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[tuple[str, str]] = []
        if isinstance(node, ast.ImportFrom):
            names = [(a.name, f"from {node.module} import {a.name}") for a in node.names]
        elif isinstance(node, ast.Attribute):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue
            names = [(node.attr, ast.unparse(node))]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "getattr", "setattr", "hasattr", "delattr") and len(node.args) >= 2:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str):
                names = [(name.value, ast.unparse(node))]
        for name, text in names:
            if name.startswith("_") and not name.startswith("__") and name not in THIRD_PARTY_PRIVATE:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {text}")
    return found


def test_no_private_name_is_imported_or_touched_across_modules():
    found = [use for path in python_files() for use in private_uses(path)]
    assert not found, "private names used outside their module (make them public or add an accessor):\n" + \
        "\n".join(found)


def test_the_private_name_check_sees_each_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from m import _hidden\nx = obj._field\ny = getattr(obj, '_other')\nz = self._mine\n")
    found = private_uses(probe, root=tmp_path)
    assert [f.split(": ", 1)[1] for f in found] == ["from m import _hidden", "obj._field",
                                                    "getattr(obj, '_other')"]


def imports_without_reason(path: Path) -> list[str]:
    """Imports inside a function body lacking a comment on their line or the line above."""
    source = path.read_text()
    lines = source.splitlines()
    found = []
    for func in ast.walk(ast.parse(source, str(path))):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                here = lines[node.lineno - 1]
                above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
                if "#" not in here and not above.startswith("#"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}")
    return found


def test_imports_inside_functions_say_why():
    found = [f for path in python_files() if path.is_relative_to(ROOT / "src") for f in imports_without_reason(path)]
    assert not found, "an import inside a function needs a one-line reason (optional or heavy dependency):\n" + \
        "\n".join(found)


def test_no_package_module_imports_the_project_inside_a_function():
    """The cycles these used to hide are gone: project imports sit at the top of a module.
    The exceptions are the command line's own modules, which load torch-heavy layers only
    once a command runs so that ``--help`` and a flag error stay instant, and the
    simulation runner, which imports the apps after setting the environment they read."""
    lazy_entry_points = {"hfedmoe/cli.py", "hfedmoe/compare.py", "hfedmoe/config.py", "hfedmoe/fl/simulation.py"}
    found = []
    for path in (ROOT / "src" / "hfedmoe").rglob("*.py"):
        where = str(path.relative_to(ROOT / "src"))
        tree = ast.parse(path.read_text())
        top = {id(n) for n in tree.body}
        for block in tree.body:  # `if TYPE_CHECKING:` imports serve annotations only, never run
            if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING":
                top |= {id(n) for n in block.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and id(node) not in top and (node.module or "").startswith("hfedmoe"):
                if where not in lazy_entry_points:
                    found.append(f"{where}:{node.lineno}: from {node.module} import ...")
    assert not found, "\n".join(found)


def test_help_and_config_errors_do_not_import_torch():
    code = ("import sys; from hfedmoe.cli import build_parser; from hfedmoe.config import ConfigError, RunConfig\n"
            "build_parser().format_help()\n"
            "try:\n    RunConfig(method='nope').validate()\nexcept ConfigError:\n    pass\n"
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "False"
