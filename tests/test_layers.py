"""The package's layers are folders, and every import runs down: a module imports only from
its own layer or the layers below it, and no modules import each other in a circle, counting
the imports a registry makes by name (`importlib.import_module`)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "isomod"
# Bottom to top. The foundation is the package's own files; `isomod/__init__.py` and
# `__main__.py` only hand names on and stand above everything.
LAYERS = ("foundation", "core", "data", "io", "training", "methods", "bench", "cli")
FOUNDATION = {"errors", "config", "distributed", "files", "seeds"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the package itself
    return "foundation" if parts[1] in FOUNDATION else parts[1]


def imports(path: Path) -> set[str]:
    """The isomod modules `path` imports: statically, or by name with import_module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("isomod"):
            # `from isomod.bench import report` takes a module; `from isomod.bench import NAMES`
            # takes a name the package's face defines, an edge to the face
            subs = {f"{node.module}.{a.name}" for a in node.names}
            found |= subs & set(MODULES)
            if subs - set(MODULES):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("isomod")}
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("isomod"):
                found.add(arg.value)
            elif isinstance(arg, ast.JoinedStr):  # f"isomod.bench.{name}": every module of that folder
                head = "".join(v.value for v in arg.values if isinstance(v, ast.Constant))
                found |= {m for m in MODULES if m.startswith(head) and m != head.rstrip(".")}
    return {m for m in found if m in MODULES}


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}
GRAPH = {m: imports(p) for m, p in MODULES.items()}


def test_every_module_lives_in_a_known_layer():
    strays = [m for m in MODULES if m not in ("isomod", "isomod.__main__") and layer(m) not in LAYERS]
    assert not strays, f"modules outside the layers {LAYERS}: {strays}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in LAYERS))
def test_imports_run_down_the_layers(module):
    mine = LAYERS.index(layer(module))
    up = sorted(m for m in GRAPH[module] if LAYERS.index(layer(m)) > mine)
    assert not up, f"{module} ({layer(module)}) imports from a higher layer: {up}"


def test_no_modules_import_each_other_in_a_circle():
    # A package's __init__ importing its own submodules (to fill a registry) is how a
    # registry is filled, not a circle, as long as those submodules do not import it back.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for n in GRAPH.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n)
        path.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def test_the_model_imports_nothing_from_training_and_the_foundation_nothing_above_it():
    core = [m for m in MODULES if layer(m) == "core"]
    assert core and not {n for m in core for n in GRAPH[m] if layer(n) not in ("foundation", "core")}
    assert not {n for m in MODULES if layer(m) == "foundation" for n in GRAPH[m] if layer(n) != "foundation"}


def test_no_module_branches_on_a_block_kind_s_name():
    """What differs between block types is the `BlockKind` record; an exporter per kind is
    looked up by name at the edge (`isomod.io.export.STATIC`)."""
    import re

    from isomod.core.blocks import KINDS
    from isomod.io.export import STATIC

    branches = [f"{m}:{i + 1}" for m, p in MODULES.items() for i, line in enumerate(p.read_text().splitlines())
                if re.search(r"block\s*[!=]=|[!=]=\s*\"(conv|transformer)\"", line)]
    assert not branches, f"branches on a block's name: {branches}"
    assert set(STATIC) == set(KINDS)


def test_a_run_is_seeded_only_through_isomod_seeds():
    """`isomod.seeds.seed` is the one call that sets torch's global generator; each call
    reads the seed of a run's config (a timing bench's fixed 0 aside)."""
    import re

    calls = {str(p.relative_to(SRC)): p.read_text() for p in SRC.rglob("*.py")}
    direct = [path for path, text in calls.items()
              if path != "seeds.py" and re.search(r"torch\.(cuda\.)?manual_seed(_all)?\(", text)]
    assert not direct, f"torch.manual_seed called outside isomod/seeds.py: {direct}"
    args = [(path, a) for path, text in calls.items() for a in re.findall(r"seeds\.seed\(([^)]*)\)", text)]
    assert args and all(re.search(r"seed\b", a) or (path == "bench/speed.py" and a == "0") for path, a in args), args
