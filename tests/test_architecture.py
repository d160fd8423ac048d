"""The shape docs/architecture.md describes: core never imports streamlit, pages never run SQL, light
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


PAGE_FILES = [REPO / "streamlit_app.py", *sorted((REPO / "app_pages").glob("*.py"))]
DB_OPENERS = {"open_db", "opened", "connect", "Database"}  # calls that hand a page a database connection
RAW_SQL_CALLS = {"execute", "executemany", "executescript", "query"}


def _call_name(node: ast.AST) -> str | None:
    if isinstance(node, ast.Call):
        func = node.func
        return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    return None


def table_access(source: str) -> list[str]:
    """Where ``source`` (a page) touches the database itself instead of calling bonescan_core.

    Found: importing sqlite3 or sqlite_utils; calling ``.execute``/``.query`` (and
    executemany/executescript) on anything; any use of a connection other than passing it
    to a function (``db["studies"]``, ``db.table(...)``, ``db.conn``), where a connection is
    a name bound from ``open_db()``/``dbm.opened()``/``connect()`` or called ``db``; and
    ``.count`` on a table.
    """
    tree = ast.parse(source)
    db_names = {"db"}
    for node in ast.walk(tree):
        if isinstance(node, ast.withitem) and _call_name(node.context_expr) in DB_OPENERS and isinstance(node.optional_vars, ast.Name):
            db_names.add(node.optional_vars.id)
        elif isinstance(node, ast.Assign) and _call_name(node.value) in DB_OPENERS:
            db_names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    found = []
    for node in ast.walk(tree):
        where = f"line {getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in ("sqlite3", "sqlite_utils")]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in RAW_SQL_CALLS:
            found.append(f"{where}: calls .{node.func.attr}()")
        elif isinstance(node, ast.Subscript | ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in db_names:
            found.append(f"{where}: uses the connection {node.value.id!r} directly ({ast.unparse(node)})")
        elif isinstance(node, ast.Attribute) and node.attr == "count" and isinstance(node.value, ast.Subscript | ast.Call):
            found.append(f"{where}: counts a table ({ast.unparse(node)})")
    return found


def test_table_access_finds_each_way_a_page_could_touch_tables():
    clean = "from bonescan_core import catalog\nwith open_db() as db:\n    rows = catalog.study_table(db)\nx = rows[0]['id']\n"
    assert table_access(clean) == []
    for snippet in ("import sqlite3", "from sqlite_utils import Database", "with open_db() as db:\n    n = db['studies'].count",
                    "with dbm.opened(path) as conn:\n    conn['runs'].insert({})", "rows = cursor.execute('SELECT 1')",
                    "db.query('SELECT 1')", "conn = dbm.connect(path)\nconn.table('runs').count", "with open_db() as db:\n    db.conn.commit()"):
        assert table_access(snippet), snippet


def test_pages_call_core_functions_and_never_touch_tables():
    """Pages read and write through bonescan_core functions only (their AST, not a string grep)."""
    offenders = [f"{path.name} {finding}" for path in PAGE_FILES for finding in table_access(path.read_text())]
    assert offenders == [], "move these into bonescan_core: " + "; ".join(offenders)


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
        f" ['--db', {str(db_path)!r}, 'runs', '--json'], ['--db', {str(db_path)!r}, 'queue', '--order', 'all', '--json']):\n"
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
    """Every Keras load_model call passes safe_mode=True: a .keras file cannot run code (no Lambda
    layers). ``runs.load_model`` is the run store's loader, whose own Keras call is checked here."""
    calls = []
    for path in python_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            store_loader = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and ast.unparse(node.func.value) == "runs"
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "load_model" \
                    and not store_loader:
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


def core_import_graph():
    """{module: set of bonescan_core modules it imports}, read with ``ast`` from every import
    statement of each module: at module level, inside functions and under TYPE_CHECKING alike
    (``from bonescan_core import x`` counts as an import of ``bonescan_core.x``)."""
    package = REPO / "bonescan_core"
    modules = {f"bonescan_core.{path.relative_to(package).with_suffix('').as_posix().replace('/', '.')}": path
               for path in package.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else "bonescan_core." + node.module
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target not in (name, "bonescan_core")}
    return graph


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}  # 1: on the current path, 2: finished
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_find_cycle_sees_a_cycle_through_a_function_level_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_bonescan_core_has_no_import_cycles():
    """No module of the package imports, directly or through others, a module that imports it
    back; function-level ("lazy") imports count, since a cycle hidden in a function is still one."""
    graph = core_import_graph()
    assert {"bonescan_core.runs", "bonescan_core.jobs", "bonescan_core.explain"} <= set(graph)
    assert "bonescan_core.training" in graph["bonescan_core.jobs"], "function-level imports are read too"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def _version(text):
    """'3.14.0' -> (3, 14, 0); enough for the release numbers compared here."""
    return tuple(int(part) for part in text.split("+")[0].split(".")[:3] if part.isdigit())


def test_keras_is_new_enough_to_keep_safe_mode_safe():
    """Keras before 3.14 lets a .keras file escape safe_mode (CVE-2025-1550, CVE-2025-8747,
    CVE-2025-9905, CVE-2026-1462): the requirement and the installed copy must both be 3.14 or later."""
    import importlib.metadata
    import re

    lines = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    keras = [line for line in lines if re.match(r"keras\s*[<>=!~]", line)]
    assert len(keras) == 1, keras
    lower = re.search(r">=\s*([\d.]+)", keras[0])
    assert lower and _version(lower.group(1)) >= (3, 14), keras[0]
    assert _version(importlib.metadata.version("keras")) >= (3, 14)


def test_the_browser_gets_no_error_details():
    """Server paths and tracebacks stay in the server log: the browser shows only the error's type."""
    import tomllib

    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["client"]["showErrorDetails"] == "type"


# Exceptions that are not errors to report: each says why in its docstring.
OUTSIDE_THE_ERROR_FAMILY = {
    "TrainingCancelled",  # control flow: unwinds a training run the user stopped; never shown as an error
    "PredictionCancelled",  # control flow: unwinds a prediction job the user stopped, as TrainingCancelled
    "_AllDuplicates",  # private control flow inside ingest: rolls back a transaction, never leaves the module
    "RejectedFile",  # imaging's per-file rejection; moves onto InputError with the imaging subpackage
    "Unreadable",  # the model bundle's predict.py runs without bonescan, so it cannot derive from BonescanError
}


def bonescan_exception_classes():
    """{qualified name: class} of every exception class defined in bonescan_core."""
    import importlib
    import inspect
    import pkgutil

    import bonescan_core

    found = {}
    for info in pkgutil.walk_packages(bonescan_core.__path__, "bonescan_core."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = value
    return found


def test_every_error_is_in_one_family():
    """Every exception bonescan defines derives from errors.BonescanError (so the CLI and the pages
    can catch the family once), and no error is defined twice (RunNotFound vs RunNotFoundError)."""
    from bonescan_core.errors import BonescanError

    classes = bonescan_exception_classes()
    assert len(classes) >= 15, sorted(classes)  # the walk found the modules
    outside = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, BonescanError) and name.rsplit(".", 1)[1] not in OUTSIDE_THE_ERROR_FAMILY)
    assert outside == []
    short = [name.rsplit(".", 1)[1].removesuffix("Error") for name in classes]
    assert sorted({n for n in short if short.count(n) > 1}) == []


def test_cli_verbs_leave_errors_to_main():
    """cli.main maps the error family to exit 2 once: no verb has its own catch list."""
    tree = ast.parse((REPO / "bonescan_core" / "cli.py").read_text())
    verbs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("cmd_")]
    assert len(verbs) >= 15
    catching = sorted(f"{verb.name}:{node.lineno}" for verb in verbs for node in ast.walk(verb) if isinstance(node, ast.Try))
    assert catching == []


def test_heavy_libraries_are_imported_only_through_the_boundary():
    """Only bonescan_core/heavy.py imports tensorflow, jax, keras, pandas or sqlite_utils (at any
    level, inside functions too); the rest reach them through its accessors. Imports under
    ``if TYPE_CHECKING:`` are for annotations only and never run."""
    guarded = {"tensorflow", "jax", "keras", "pandas", "sqlite_utils"}
    # Copied into every model bundle and run without bonescan: they import keras themselves.
    standalone = {REPO / "bonescan_core" / "bundle" / name for name in ("predict.py", "bonescan_layers.py")}
    offenders = []
    for path in sorted((REPO / "bonescan_core").rglob("*.py")):
        if path.name == "heavy.py" or path in standalone:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        typing_only = {id(inner) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
                       for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            offenders += [f"{path.name}:{node.lineno} {name}" for name in names if name.split(".")[0] in guarded]
    assert offenders == [], "import these through bonescan_core.heavy: " + "; ".join(offenders)
