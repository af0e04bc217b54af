"""The package's shape: one-way layers, no import cycles, one import name per module.

`fedrad.common` is mathematics and schemas, `fedrad.client` runs in a hospital, `fedrad.server` at the
coordinator. A hospital installs and audits the client side; an import from the coordinator's code
there would make the audit incomplete, and a cycle makes the order of imports matter.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"common": 0, "client": 1, "server": 2}  # a layer may import its own and lower ones
TOP_LEVEL = {"common", "client", "server"}  # the folders' names: never import names


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(("fedrad", *parts))


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at module level or inside functions."""
    found = []
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]  # `from fedrad import common`
    return found


def _package_files():
    return sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py"))


def _known_modules() -> set[str]:
    return {_module_name(p) for p in _package_files()}


def _fedrad_target(name: str, known: set[str]) -> str | None:
    """The fedrad module an imported name lands in (`fedrad.common.cox.FederatedCoxPH` -> `fedrad.common.cox`)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_no_module_imports_a_higher_layer():
    known = _known_modules()
    upward = set()
    for path in _package_files():
        own = LAYERS[path.relative_to(ROOT).parts[0]]
        for line, name in _imports(path):
            target = _fedrad_target(name, known)
            if target and target.startswith("fedrad.") and len(target.split(".")) > 1:
                layer = target.split(".")[1]
                if LAYERS[layer] > own:
                    upward.add(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert not upward, "imports against the layers (server -> client -> common):\n" + "\n".join(sorted(upward))


def test_nothing_imports_the_folders_by_their_bare_names():
    """`import common` would load a second copy of a module (or an unrelated package called `common`)."""
    bare = []
    for path in [*_package_files(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").rglob("*.py")]:
        for line, name in _imports(path):
            if name.split(".")[0] in TOP_LEVEL:
                bare.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bare, "use fedrad.common / fedrad.client / fedrad.server:\n" + "\n".join(bare)


def test_there_is_no_import_cycle():
    known = _known_modules()
    graph = {m: set() for m in known}
    for path in _package_files():
        source = _module_name(path)
        for _, name in _imports(path):
            target = _fedrad_target(name, known)
            # a package's __init__ is imported by its modules anyway: not an edge of interest
            if target and target != source and not source.startswith(target + "."):
                graph[source].add(target)
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles (lazy imports inside functions count too):\n" + "\n".join(cycles)


def test_the_checker_sees_an_upward_and_a_bare_import(tmp_path, monkeypatch):
    """The checks above would pass vacuously if `_imports` missed imports; show they find both kinds."""
    client = tmp_path / "client"
    client.mkdir()
    (client / "bad.py").write_text("def f():\n    from fedrad.server.report import write_report\n"
                                   "    import common.study\n", encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    names = [name for _, name in _imports(client / "bad.py")]
    assert "fedrad.server.report" in names and "common.study" in names
    assert _module_name(client / "bad.py") == "fedrad.client.bad"


def test_the_installed_names_are_fedrad_only(tmp_path):
    """From outside the repository (no checkout folder on sys.path), only `fedrad.*` imports."""
    probe = ("import importlib.util, fedrad.common, fedrad.client, fedrad.server\n"
             "print([n for n in ('common', 'client', 'server') if importlib.util.find_spec(n)])\n")
    found = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True, encoding="utf-8")
    assert found.stdout.strip() == "[]", found.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources: setuptools' build/ folder in the checkout would keep deleted modules."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for layer in LAYERS:
        shutil.copytree(ROOT / layer, source / layer, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--disable-pip-version-check", "-w", str(out), str(source)], check=True, capture_output=True)
    (built,) = out.glob("fedrad-*.whl")
    return built


def test_a_plain_wheel_holds_the_fedrad_packages_and_their_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedrad"}
    for layer in LAYERS:
        assert f"fedrad/{layer}/__init__.py" in names
        assert {f"fedrad/{layer}/{p.name}" for p in (ROOT / layer).glob("*.py")} <= names
    assert {f"fedrad/client/params/{p.name}" for p in (ROOT / "client" / "params").glob("*.yaml")} <= names
    for layer in ("client", "server"):
        assert {f"fedrad/{layer}/templates/{p.name}" for p in (ROOT / layer / "templates").glob("*.html")} <= names
    entry = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "fedrad = fedrad.server.cli:app" in entry


def test_the_wheel_imports_from_where_it_is_installed(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    probe = (f"import sys; sys.path.insert(0, {str(target)!r})\n"
             "import fedrad.common.study, fedrad.client.extraction as x, fedrad.server.cli\n"
             "print(fedrad.common.study.__file__); print(x.default_params_path())\n")
    shown = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True, encoding="utf-8")
    study_file, params = shown.stdout.split()
    assert Path(study_file).is_relative_to(target) and Path(params).is_relative_to(target)
    assert Path(params).is_file()
