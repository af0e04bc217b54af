"""Every text file and pipe names its encoding: fedrad must behave the same under any locale.

CI and some hospital servers run Python with an ASCII locale (LANG=C, no UTF-8 mode); there
`Path.read_text()` decodes with ASCII and fails on the "ε", "—" and "≥" that fedrad's own logs and
Flower's messages hold. The suite once passed here and failed in CI for exactly that reason.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("common", "client", "server", "tests", "bench")
TEXT_IO = {"read_text", "write_text", "open"}
PIPES = {"run", "Popen", "check_output"}


def _name(call: ast.Call) -> str | None:
    func = call.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _is_binary_or_os_open(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in ("os", "tarfile",
                                                                                                  "zipfile", "gzip"):
        return True
    mode = next((k.value for k in call.keywords if k.arg == "mode"), None)
    if mode is None:
        positional = call.args[1:] if isinstance(func, ast.Name) else call.args[:1]
        mode = positional[0] if positional else None
    return isinstance(mode, ast.Constant) and "b" in str(mode.value)


def _unnamed_encodings(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        name = _name(node)
        text_pipe = name in PIPES and any(k.arg in ("text", "universal_newlines") for k in node.keywords)
        if (name in TEXT_IO and not _is_binary_or_os_open(node)) or text_pipe:
            found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}(...) without encoding=")
    return found


def test_every_text_read_write_and_pipe_names_its_encoding():
    found = [hit for folder in SOURCES for path in sorted((ROOT / folder).rglob("*.py"))
             for hit in _unnamed_encodings(path)]
    assert not found, "\n".join(found)


def test_the_command_prints_non_ascii_under_an_ascii_locale(tmp_path):
    """The root command reconfigures stdout/stderr so a name like "Hôpital—A" prints instead of crashing."""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    fedrad = Path(sys.executable).parent / "fedrad"
    study = tmp_path / "study.toml"
    study.write_text('[study]\nstages = ["census"]\n', encoding="utf-8")
    site = f"Hôpital—A={tmp_path / 'Hôpital—A'}".encode("utf-8")  # bytes: this process may be ASCII too
    shown = subprocess.run([fedrad, "local", "--site", site, "--study", study, "--out", tmp_path / "run"],
                           capture_output=True, env=env, timeout=120)
    err = shown.stderr.decode("ascii")  # an ASCII locale gets ASCII, non-ASCII escaped
    assert "Traceback" not in err and "UnicodeEncodeError" not in err, err
    assert shown.returncode == 2 and "pital" in err and "the store does not exist" in err, err
