"""The package's import rules, checked on its source: data and calls flow one way.

- A lower package never imports a higher one: checks/shapes/runtime < layers, memory < models,
  data, parallel < training, decoding < interop < configs, arguments < the programs (cli, bench).
- No module imports another module's private (`_name`) names.
- Only the programs import `terraformer` modules inside functions (to start fast).
- `MASK_VALUE` is defined once.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "terraformer"
LEVEL = {
    "checks": 0, "shapes": 0, "runtime": 0, "flops": 0, "peak": 0,
    "layers": 1, "memory": 1,
    "models": 2, "data": 2, "parallel": 2,
    "training": 3, "decoding": 3,
    "interop": 4,
    "configs": 5, "arguments": 5,
    "cli": 6, "bench": 6, "bench_attention": 6,
}
PROGRAMS = {"cli", "bench", "bench_attention"}
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def _top(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imports(path: Path):
    """(line, imported module, imported names, inside a function?) of each terraformer import."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            module, names = node.module, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            module, names = node.names[0].name, []
        else:
            continue
        if module == "terraformer" or module.startswith("terraformer."):
            yield node.lineno, module, names, node.col_offset > 0


def test_every_top_level_module_has_a_level():
    assert {_top(p) for p in MODULES} - {"__init__"} <= set(LEVEL)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_rules(path):
    me = _top(path)
    for line, module, names, in_function in _imports(path):
        parts = module.split(".")
        target = parts[1] if len(parts) > 1 else None
        where = f"{path.relative_to(PACKAGE)}:{line}"
        if target in LEVEL and me in LEVEL:
            assert LEVEL[target] <= LEVEL[me], f"{where}: {me} imports the higher {module}"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{where}: imports private names {private} of {module}"
        assert not in_function or me in PROGRAMS, f"{where}: imports {module} inside a function"


def test_one_mask_value():
    definitions = [p for p in MODULES if "\nMASK_VALUE = " in p.read_text()]
    assert [p.name for p in definitions] == ["attention_core.py"]
