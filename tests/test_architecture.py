"""The shape DESIGN.md promises: core never imports streamlit, pages never run SQL, light
CLI verbs never import TensorFlow."""

import ast
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


HEAVY = ("tensorflow", "keras", "streamlit", "torch", "jax", "pandas", "sklearn")


def test_light_verbs_import_no_heavy_library(db_path):
    """Light verbs run in a fresh interpreter; at exit no heavy library is in ``sys.modules``,
    not even as a ``None`` placeholder (a stub would be listed too), and pandas can still be
    imported afterwards (nothing left it blocked)."""
    code = (
        "import sys, io, contextlib\n"
        "from bonescan_core.cli import main\n"
        f"for argv in (['--db', {str(db_path)!r}, 'init'], ['--db', {str(db_path)!r}, 'demo', '--studies', '2'],"
        f" ['--db', {str(db_path)!r}, 'studies', '--json'], ['--db', {str(db_path)!r}, 'images', '--json'],"
        f" ['--db', {str(db_path)!r}, 'runs', '--json']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        assert main(argv) == 0, argv\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "import pandas\n"
        "print(pandas.DataFrame({'a': [1]}).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    loaded, shape = result.stdout.strip().splitlines()
    assert loaded == "[]"
    assert shape == "(1, 1)"


def python_files():
    for folder in ("bonescan_core", "app_pages"):
        yield from sorted((REPO / folder).rglob("*.py"))
    yield REPO / "streamlit_app.py"


def test_sql_is_parameterised():
    """No value is formatted into SQL: f-strings passed to execute/query may only splice in
    placeholder lists (``marks``) or module constants (UPPER_CASE), never data."""
    offenders = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("execute", "executemany", "executescript", "query") and node.args):
                continue
            sql = node.args[0]
            if isinstance(sql, ast.BinOp):  # "..." + value or "..." % value
                offenders.append(f"{path.name}:{node.lineno}: SQL built with an operator")
            elif isinstance(sql, ast.JoinedStr):
                for part in sql.values:
                    if isinstance(part, ast.FormattedValue):
                        names = {n.id for n in ast.walk(part.value) if isinstance(n, ast.Name)}
                        if not names or not all(name in ("marks", "int", "len") or name.isupper() for name in names):
                            offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(part.value)} formatted into SQL")
            elif isinstance(sql, ast.Call) and isinstance(sql.func, ast.Attribute) and sql.func.attr == "format":
                offenders.append(f"{path.name}:{node.lineno}: SQL built with str.format")
    assert offenders == []


def test_models_are_loaded_in_safe_mode():
    """Every load_model call passes safe_mode=True: a .keras file cannot run code (no Lambda layers)."""
    calls = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "load_model":
                safe = {k.arg: k.value for k in node.keywords}.get("safe_mode")
                calls.append((path.name, node.lineno, isinstance(safe, ast.Constant) and safe.value is True))
    assert calls, "the run model is loaded somewhere"
    assert [call for call in calls if not call[2]] == []


def test_app_defaults_bind_loopback_and_limit_uploads():
    import tomllib

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "127.0.0.1"
    assert 0 < config["server"]["maxUploadSize"] <= 200
    assert config["browser"]["gatherUsageStats"] is False
