"""The shape DESIGN.md promises: core never imports streamlit, pages never run SQL, light
CLI verbs never import TensorFlow."""

import ast
import json
import subprocess
import sys

from conftest import REPO


def imported_modules(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_core_never_imports_streamlit():
    offenders = [
        f"{path.name}: {module}"
        for path in sorted((REPO / "bonescan_core").rglob("*.py"))
        for module in imported_modules(path)
        if module.split(".")[0] == "streamlit"
    ]
    assert offenders == []


def test_pages_run_no_sql():
    for path in [REPO / "streamlit_app.py", *sorted((REPO / "app_pages").glob("*.py"))]:
        text = path.read_text()
        for needle in ("SELECT ", "INSERT ", "UPDATE ", ".execute(", ".query("):
            assert needle not in text, f"{path.name} contains {needle!r}: move it into bonescan_core"


def test_light_verbs_import_no_heavy_library(db_path):
    code = (
        "import sys, io, contextlib\n"
        "from bonescan_core.cli import main\n"
        f"for argv in (['--db', {str(db_path)!r}, 'studies', '--json'], ['--db', {str(db_path)!r}, 'images', '--json'],"
        f" ['--db', {str(db_path)!r}, 'init']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'streamlit', 'torch', 'jax', 'pandas', 'sklearn')"
        " if sys.modules.get(m) is not None))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert json.loads(result.stdout.strip().replace("'", '"')) == []
