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


def test_science_layer_does_not_import_reports_or_wiring():
    """Imports go one way (issue 20): the science modules never import the reports, the nipype
    adapters, the workflows or the command line, at the top of a module or inside a function."""
    import ast
    from pathlib import Path

    root = Path(fcflow.__file__).resolve().parent
    upper = ("fcflow.reports", *_WIRING)
    found = []
    for module in _science_modules():
        if module.startswith("fcflow.reports"):
            continue  # the reports are above the science: they may import it, not the other way
        path = root.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{module} imports {name} (line {node.lineno})" for name in names
                      if name == "fcflow" and isinstance(node, ast.ImportFrom)
                      and any(f"fcflow.{a.name}".startswith(upper) for a in node.names)
                      or name.startswith(upper)]
    assert not found, found


def test_no_module_imports_another_modules_private_names():
    """Issue 20: a helper another module needs is public (documented, named for what it does);
    ``from fcflow.x import _helper`` couples two modules through a name that promises nothing."""
    import ast
    from pathlib import Path

    root = Path(fcflow.__file__).resolve().parent
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fcflow"):
                found += [f"{path.relative_to(root.parent)}:{node.lineno} imports {node.module}.{a.name}"
                          for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found, found


#: Modules that read or write files of the datasets, and why; every other module of the science
#: layer computes on arrays and tables only and must not import fcflow.io, fcflow.derivatives or
#: fcflow.lock (issue 20).
_FILE_LAYER = {
    "fcflow.io": "the atomic writers",
    "fcflow.derivatives": "BIDS-derivative names, sidecars, the participant level's tables",
    "fcflow.lock": "output-directory locks",
    "fcflow.group.inputs": "reads the participant level's maps and QC tables",
    "fcflow.group.outputs": "writes group/",
    "fcflow.group.run": "runs one unit of the group level: inputs, inference, outputs",
    "fcflow.plotting": "writes figures for the reports",
    "fcflow.simulate.nifti": "writes synthetic studies",
    "fcflow.simulate.study": "writes synthetic studies",
    "fcflow.atlas.fetch": "finds, downloads and caches the Julich-Brain files (atomic writes, SHA-256 manifest)",
    "fcflow.atlas.seedqc": "records the SHA-256 of a user's seed mask file in the seed's provenance",
    "fcflow.runfiles": "the first level's file side: a run's prepared inputs in, its results into its node folder",
}


def test_science_layer_reads_and_writes_no_dataset_files():
    """The science modules outside :data:`_FILE_LAYER` import neither the writers (``fcflow.io``), the
    derivatives' names and tables (``fcflow.derivatives``) nor the locks; the group level's inference
    (``fcflow.group.inference``) is one of them."""
    import ast
    from pathlib import Path

    root = Path(fcflow.__file__).resolve().parent
    files = ("fcflow.io", "fcflow.derivatives", "fcflow.lock")
    science = [m for m in _science_modules() if m not in _FILE_LAYER and not m.startswith("fcflow.reports")]
    assert {"fcflow.group.inference", "fcflow.permutation", "fcflow.firstlevel", "fcflow.qc",
            "fcflow.atlas.seeds"} <= set(science)
    found = []
    for module in science:
        path = root.joinpath(*module.split(".")[1:])
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{module} imports {name} (line {node.lineno})" for name in names if name in files]
    assert not found, found
    assert set(_FILE_LAYER) <= set(_science_modules()), "a module named in _FILE_LAYER no longer exists"
