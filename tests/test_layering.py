"""The shape the code keeps: lower layers never import higher ones, and training reads in short functions."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "weitiao"


def weitiao_imports(path: Path) -> set[str]:
    """Every weitiao module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("weitiao"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("weitiao"))
    return found


@pytest.mark.parametrize("layer", ["data", "eval", "train"])
def test_lower_layers_never_import_serve(layer):
    offenders = {str(path.relative_to(SRC)): sorted(m for m in weitiao_imports(path) if m.startswith("weitiao.serve"))
                 for path in (SRC / layer).rglob("*.py")}
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_the_generation_engine_imports_no_stage_above_it():
    above = ("weitiao.serve", "weitiao.eval", "weitiao.train")
    offenders = {str(path.relative_to(SRC)): sorted(m for m in weitiao_imports(path) if m.startswith(above))
                 for path in (SRC / "generation").rglob("*.py")}
    assert not {path: modules for path, modules in offenders.items() if modules}


def test_the_config_and_the_method_registry_import_no_feature_module():
    assert weitiao_imports(SRC / "config.py") <= {"weitiao.errors", "weitiao.methods"}
    assert weitiao_imports(SRC / "methods.py") <= {"weitiao.errors", "weitiao.config"}  # config: type hints only


def test_no_training_function_is_longer_than_80_lines():
    lengths = {f"{path.name}:{node.name}": node.end_lineno - node.lineno + 1
               for path in (SRC / "train").rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
               if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert max(lengths.values()) <= 80, sorted(lengths.items(), key=lambda item: -item[1])[:3]


def test_eval_never_imports_train():
    """Training imports eval (its loss, pair scoring); eval importing train would be a cycle. Code that needs both
    (the selection report) is handed the training function by its caller."""
    offenders = {str(path.relative_to(SRC)): sorted(m for m in weitiao_imports(path) if m.startswith("weitiao.train"))
                 for path in (SRC / "eval").rglob("*.py")}
    assert not {path: modules for path, modules in offenders.items() if modules}
