"""The package's structure: no module reaches into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import medlatent

PACKAGE = Path(medlatent.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names (relative imports resolved against `here`)."""
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def private_imports() -> list[str]:
    """`from medlatent.x import _name` (or `from .x import _name`) in a module other than x, and
    `x._name` on a medlatent module imported by name."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here, tree = _module_name(path), ast.parse(path.read_text(encoding="utf-8"))
        modules = {}  # local names bound to medlatent modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(node, here, path.name == "__init__.py")
                if not source.startswith("medlatent"):
                    continue
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__") and source != here:
                        found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {source}.{alias.name}")
                    modules[alias.asname or alias.name] = f"{source}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("medlatent"):
                        modules[alias.asname or alias.name.split(".")[0]] = alias.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {modules[node.value.id]}.{node.attr}")
    return found


def test_no_module_imports_a_private_name_of_another():
    assert private_imports() == []


def test_the_check_finds_a_private_import(tmp_path, monkeypatch):
    import tests.test_structure as me

    fake = tmp_path / "medlatent"
    (fake / "audits").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "audits" / "__init__.py").write_text("")
    (fake / "audits" / "gap.py").write_text("def _savez():\n    pass\n")
    (fake / "audits" / "augment.py").write_text("from .gap import _savez\nfrom . import gap\ngap._savez()\n")
    monkeypatch.setattr(me, "PACKAGE", fake)
    assert private_imports() == [
        "audits/augment.py:1: medlatent.audits.gap._savez",
        "audits/augment.py:3: medlatent.audits.gap._savez",
    ]


def imported_packages(package: str) -> set[str]:
    """The medlatent subpackages that the modules of `package` (e.g. "diffusion") import."""
    found = set()
    for path in sorted((PACKAGE / package).rglob("*.py")):
        here, tree = _module_name(path), ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(node, here, path.name == "__init__.py")
                names = [source] if source != "medlatent" else [f"medlatent.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found |= {name.split(".")[1] for name in names if name.startswith("medlatent.") and name.count(".") >= 1}
    return found - {package}


def test_the_maths_imports_no_models_pipelines_or_workflows():
    """diffusion/ is maths that models/ builds on: no import cycle, and no workflow inside it."""
    assert imported_packages("diffusion") & {"models", "pipelines", "audits", "classifiers", "api", "cli"} == set()
    assert imported_packages("models") & {"pipelines", "audits", "classifiers", "api", "cli"} == set()
