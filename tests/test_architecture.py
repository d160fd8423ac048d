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
