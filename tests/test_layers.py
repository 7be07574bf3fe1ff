"""The science layer does not import nipype (STYLE.md: three layers, imports one way)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import fcflow

# Modules that are wiring (nipype) or command line by design.
_WIRING = ("fcflow.interfaces", "fcflow.workflows", "fcflow.cli")


def _science_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(fcflow.__path__, prefix="fcflow."):
        if not info.name.startswith(_WIRING) and info.name != "fcflow.__main__":
            names.append(info.name)
    return names


def test_science_layer_does_not_import_nipype():
    modules = _science_modules()
    assert "fcflow.config" in modules
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + (
        "bad = sorted(m for m in sys.modules if m == 'nipype' or m.startswith('nipype.'))\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"science modules pulled in nipype: {done.stdout}"


def test_science_layer_raises_fcflow_errors_not_bare_value_errors():
    """Issue 20: one error family. A science function's bad input is an ``FcflowError`` (``InputDataError``
    is also a ``ValueError``, so callers that catch ``ValueError`` still do), which the command line
    prints as one line; a bare ``ValueError`` would reach the user as a traceback."""
    import ast
    from pathlib import Path

    root = Path(fcflow.__file__).resolve().parent
    found = []
    for module in _science_modules():
        path = root.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) \
                    and getattr(node.exc.func, "id", None) == "ValueError":
                found.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert not found, f"bare ValueError raised in the science layer: {found}"
