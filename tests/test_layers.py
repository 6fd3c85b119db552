"""The packages form floors and every import points down (README, "Layout").

Read from the source (every ``import`` statement, also those inside functions, and every
``importlib.import_module("...")`` with a literal name), so a late import cannot hide a
layer crossing. Nothing is imported here.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Lowest first: a package may import its own floor and the ones below it.
FLOORS = ["nextchat_core", "labelstudio", "training", "backend", "nextchat_cli"]

# Third-party packages a floor must not import (each floor's list includes those of the
# floors above it that also apply to it).
FORBIDDEN: dict[str, set[str]] = {
    "nextchat_core": {"requests", "label_studio_sdk", "celery", "kombu", "redis", "flask"},
    "labelstudio": {"celery", "kombu", "redis", "flask", "gunicorn"},
    "training": {"flask", "gunicorn"},
}


def imported_modules(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``path`` (a file under ``root``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            # `from pkg import module` imports pkg.module
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return out


def sources() -> list[Path]:
    return sorted(p for floor in FLOORS for p in (REPO / floor).rglob("*.py"))


def floor_of(module: str) -> int | None:
    top = module.split(".")[0]
    return FLOORS.index(top) if top in FLOORS else None


def wrong_imports(path: Path, root: Path = REPO) -> list[str]:
    """Imports of ``path`` that point to a higher floor or to a package banned on its own."""
    own = floor_of(path.relative_to(root).parts[0])
    assert own is not None
    banned = FORBIDDEN.get(FLOORS[own], set())
    wrong = []
    for line, module in imported_modules(path, root):
        floor = floor_of(module)
        if floor is not None and floor > own:
            wrong.append(f"line {line}: {module} (floor {FLOORS[floor]})")
        if module.split(".")[0] in banned:
            wrong.append(f"line {line}: {module} (not allowed in {FLOORS[own]})")
    return wrong


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_point_down(path: Path) -> None:
    wrong = wrong_imports(path)
    assert not wrong, (
        f"{path.relative_to(REPO)} imports upward or a banned package (floors, lowest "
        f"first: {' < '.join(FLOORS)}): {wrong}; move the code to the floor it belongs on, "
        "or pass what it needs in from above"
    )


def test_the_check_sees_late_relative_and_by_name_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "labelstudio" / "coco"
    pkg.mkdir(parents=True)
    probe = pkg / "probe.py"
    probe.write_text(
        "import importlib\n"
        "from ...training import store\n"  # relative, two floors up: training
        "def f():\n"
        "    import requests\n"  # allowed on this floor
        "    from backend.app import create_app\n"  # late and upward
        "    importlib.import_module('nextchat_cli.main')\n"  # by name and upward
    )
    wrong = wrong_imports(probe, tmp_path)
    assert any("training" in w for w in wrong), wrong
    assert any("backend.app" in w for w in wrong), wrong
    assert any("nextchat_cli.main" in w for w in wrong), wrong
    assert not any("requests" in w for w in wrong), wrong
    core = tmp_path / "nextchat_core" / "x.py"
    core.parent.mkdir()
    core.write_text("def g():\n    import label_studio_sdk\n")
    assert wrong_imports(core, tmp_path) == [
        "line 2: label_studio_sdk (not allowed in nextchat_core)"
    ]


def test_importing_does_no_work(tmp_path: Path) -> None:
    """Importing any module (except the WSGI entry point, whose job is to build the app)
    reads and validates no setting, builds no Celery app and creates no ``MODEL_DIR``."""
    modules = [
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in sources()
        if p.name != "__main__.py" and p.relative_to(REPO).as_posix() != "backend/wsgi.py"
    ]
    model_dir = tmp_path / "model-dir"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "RETRAIN_"))}
    env.update(
        PYTHONPATH=str(REPO),
        MODEL_DIR=str(model_dir),
        RETRAIN_EPOCHS="not a number",  # would raise if validated at import
        NEXTCHAT_MAX_IMAGE_PIXELS="not a number",
    )
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "from training.celery_app import get_app\n"
        "assert get_app.cache_info().currsize == 0, 'a Celery app was built at import'\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert not model_dir.exists(), "importing created MODEL_DIR"
