"""The package layout by layer (README "Where things live"): read from the import graph of hpcmoe's
modules, every import counted, at the top of a module or inside a function."""

import ast
import importlib
import os

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, "hpcmoe")
# a layer -> the layers it must not import
LOWER = {
    "model": {"runtime", "sim", "analysis"},
    "parallel": {"runtime", "sim", "analysis"},
    "runtime": {"sim", "analysis"},
    "runfile": {"runtime", "sim", "analysis"},  # the engine writes the file; the file knows no engine
    "config": {"runtime", "runfile", "sim", "analysis"},  # read by every layer, model and parallel too
    "workload": {"config", "runtime", "runfile", "sim", "analysis"},  # below the config that reads it
}


def modules() -> dict:
    """hpcmoe's modules by dotted name -> their file."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted[: -len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def import_graph() -> dict:
    """module -> the hpcmoe modules it imports (a name imported from a package counts as its module
    when it is one, else as the package)."""
    known, graph = modules(), {}
    for module, path in known.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names if alias.name.startswith("hpcmoe"))
            elif isinstance(node, ast.ImportFrom):
                source = node.module or ""
                if node.level:  # relative: from the module's own package
                    package = module.split(".")[
                        : len(module.split(".")) - node.level + (path.endswith("__init__.py"))
                    ]
                    source = ".".join(package + ([source] if source else []))
                if source.startswith("hpcmoe"):
                    for alias in node.names:
                        inner = f"{source}.{alias.name}"
                        imported.add(inner if inner in known else source)
        graph[module] = {name for name in imported if name in known and name != module} - {"hpcmoe"}
    return graph


def layer(module: str) -> str:
    """hpcmoe.sim.net -> sim; the package hpcmoe.sim -> sim; top-level modules (cli, progress) -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or os.path.isdir(os.path.join(PACKAGE, parts[-1])) else ""


def test_the_graph_is_read():
    graph = import_graph()
    assert len(graph) > 40 and graph["hpcmoe.sim.net"] >= {
        "hpcmoe.runtime.exchange_context",
        "hpcmoe.sim.events",
    }


def test_lower_layers_do_not_import_higher_ones():
    wrong = [
        f"{module} imports {name}"
        for module, names in import_graph().items()
        for name in sorted(names)
        if layer(name) in LOWER.get(layer(module), set())
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_command_line_reaches_the_commands():
    """hpcmoe/commands/ is the top: cli.py calls it (by name, from its COMMANDS table); nothing imports it."""
    from hpcmoe.cli import COMMANDS

    wrong = [
        f"{module} imports {name}"
        for module, names in import_graph().items()
        for name in names
        if layer(name) == "commands" and layer(module) != "commands"
    ]
    assert not wrong, "\n".join(wrong)
    for module, function in COMMANDS.values():
        assert callable(getattr(importlib.import_module(f"hpcmoe.commands.{module}"), function))


def test_no_module_imports_itself_through_others():
    graph, cycles = import_graph(), []

    def visit(module, path):
        for name in sorted(graph[module]):
            if name == path[0]:
                cycles.append(" -> ".join(path + [name]))
            elif name not in path and name > path[0]:  # each cycle once, from its smallest module
                visit(name, path + [name])

    for module in sorted(graph):
        visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_every_package_says_what_it_owns():
    for name in (
        "config",
        "model",
        "parallel",
        "workload",
        "runtime",
        "runfile",
        "sim",
        "analysis",
        "commands",
    ):
        with open(os.path.join(PACKAGE, name, "__init__.py")) as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        assert doc and len(doc.split()) >= 15, name


MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60  # lines of at most 110 characters: ruff (ruff.toml)


def test_rooms_a_person_can_read():
    """No module of hpcmoe over 400 lines, no function over 60 (decorators not counted)."""
    long_modules, long_functions = [], []
    for module, path in modules().items():
        with open(path) as f:
            text = f.read()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {length} lines")
    assert not long_modules and not long_functions, "\n".join(long_modules + long_functions)
