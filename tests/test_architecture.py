"""The package's import graph (read from the source with ast): moelora's modules import each
other one way, at module level only, so no import cycle exists and none is hidden inside a
function, and every layer of the package imports only the layers below it (README,
"Architecture")."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "moelora")


def _modules() -> dict:
    """{dotted module name: path} of every Python file of the moelora package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py") or name.endswith(".so"):  # .so: the native extension (no imports)
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, ROOT).split(".")[0].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _imports(module: str, path: str, known: set):
    """(imported moelora module, line, at module level) for every import in ``path``."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}

    def resolve(node):
        if isinstance(node, ast.Import):
            return [alias.name for alias in node.names]
        base = node.module or ""
        if node.level:
            anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
            base = ".".join(anchor + ([base] if base else []))
        out = []
        for alias in node.names:  # ``from pkg import module`` names a module; else the import is of pkg
            out.append(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        return out

    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in resolve(node):
                while target and target not in known:  # ``import moelora.x.y`` or a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    yield target, node.lineno, id(node) in top_level or _inside_module_level_block(tree, node)


def _inside_module_level_block(tree, node) -> bool:
    """An import inside a module-level ``try`` / ``if`` block (optional dependencies) is at module level."""
    for statement in tree.body:
        if isinstance(statement, (ast.Try, ast.If)) and any(n is node for n in ast.walk(statement)):
            return True
    return False


def _graph():
    modules = _modules()
    known = set(modules)
    return {m: list(_imports(m, path, known)) if path.endswith(".py") else [] for m, path in modules.items()}


def test_moelora_modules_import_each_other_at_module_level_only():
    local = [f"{m}:{line} imports {target}" for m, edges in _graph().items() for target, line, top in edges if not top]
    assert not local, "function-local imports of moelora modules:\n" + "\n".join(local)


def test_no_import_cycles():
    graph = {m: sorted({t for t, _, _ in edges}) for m, edges in _graph().items()}
    # Package __init__ files import their submodules; a submodule importing its package's
    # __init__ back (``from moelora import x`` inside moelora) would close a cycle and is reported.
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


# The layers, bottom up, by the first name under moelora (a folder or a top-level module).
LAYERS = [{"kernels", "switches", "_C", "_cxx_runtime"}, {"ops", "profiling"}, {"modules"}, {"tuner"},
          {"persistence"}, {"model"}, {"integrations"}, {"reference", "hf_trainer"}, {""}, {"demo"}]


def _layer(module: str) -> tuple:
    """(rank, part) of a moelora module; the package's own __init__ is part "" (the top)."""
    part = module.split(".")[1] if "." in module else ""
    return next(rank for rank, parts in enumerate(LAYERS) if part in parts), part


def test_every_layer_imports_only_the_layers_below_it():
    upward = []
    for module, edges in _graph().items():
        rank, part = _layer(module)
        for target, line, _ in edges:
            target_rank, target_part = _layer(target)
            if target_part != part and target_rank >= rank:
                upward.append(f"{module}:{line} imports {target}")
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_every_module_has_a_layer():
    assert all(_layer(m) for m in _graph())


@pytest.mark.parametrize("source, expected", [
    ("from . import b\n", {"moelora.b"}),
    ("from .b import thing\n", {"moelora.b"}),
    ("def f():\n    from .b import thing\n", {"moelora.b"}),
    ("import moelora.b\n", {"moelora.b"}),
])
def test_the_graph_sees_every_form_of_import(tmp_path, source, expected):
    path = tmp_path / "a.py"
    path.write_text(source)
    assert {t for t, _, _ in _imports("moelora.a", str(path), {"moelora", "moelora.a", "moelora.b"})} == expected


def test_documented_import_paths_keep_working():
    """The public API (moelora.*) and the import paths the documentation gave before the
    package was reorganised."""
    import importlib

    import moelora
    from moelora.reference import dense_gates, moe_lora_naive, moe_lora_torch  # noqa: F401

    assert moelora.reference.moe_lora_naive is moe_lora_naive
    for name in moelora.__all__:
        assert getattr(moelora, name) is not None, name
    if importlib.util.find_spec("transformers") is not None:
        from moelora.hf_trainer import MoELoRATrainer  # noqa: F401
