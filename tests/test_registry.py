"""One contract for every method: attributes the benches and the CLI read, and no method name
written into a bench or the command line."""

import ast
from pathlib import Path

import pytest

from isomod.methods.adapt import ADAPT
from isomod.methods.registry import ROLES
from isomod.methods.transfer import TRANSFER

SRC = Path(__file__).parents[1] / "src" / "isomod"
NAMES = set(TRANSFER.names()) | set(ADAPT.names()) | {m.row for m in (*TRANSFER, *ADAPT)}


def method_names_in(path: Path) -> list[tuple[int, str]]:
    """String constants equal to a method's name, outside keys of rows read by subscript and a
    search's `proxy=` (a proxy is called `head` too)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript):
            skip.add(id(node.slice))
        elif isinstance(node, ast.keyword) and node.arg == "proxy":
            skip.add(id(node.value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and n.value in NAMES and id(n) not in skip]


@pytest.mark.parametrize("path", sorted([*(SRC / "bench").glob("*.py"), *(SRC / "cli").glob("*.py")]), ids=str)
def test_no_bench_and_no_command_names_a_method(path):
    if path.name == "claims.py":  # the claims' own registration names what each claim compares
        pytest.skip("claims are registered by name")
    found = method_names_in(path)
    assert not found, f"{path.name} names methods: {found}; read the registry's attributes instead"


@pytest.mark.parametrize("registry", [TRANSFER, ADAPT], ids=["transfer", "adapt"])
def test_every_method_states_its_contract(registry):
    names = registry.names()
    assert registry.default() in names
    for m in registry:
        assert m.changes <= set(ROLES) and all(c in names for c in m.compare), m.name
        assert not m.whole_network or "network" in m.changes
        assert m.route_alone == ("route" in m.changes and m.changes <= {"route", "statistics"})
    styles = [m.style for m in registry if m.style != ("o", "tab:gray")]
    assert len(set(styles)) == len(styles) or registry is ADAPT  # a transfer plot tells every method apart


def test_the_attributes_say_what_the_old_name_lists_said():
    assert TRANSFER.where(lambda m: m.whole_network) == ("finetune", "scratch")
    assert TRANSFER.where(lambda m: m.searches) == ("stats_head", "route_search")
    assert TRANSFER.baselines("transfer") == ("head_only",) and TRANSFER.default() == "route_only"
    assert ADAPT.where(lambda m: m.setting == "few_labels" and m.route_alone) == ("route", "route_search")
    assert ADAPT.baselines("few_labels") == ("adabn", "norm_patch") and ADAPT.default() == "route_select"
    assert ADAPT.where(lambda m: m.owns_head) == ("head_only", "finetune")
    assert ADAPT["source_only"].row == "source_only_best" and ADAPT.by_row("source_only_best").name == "source_only"


def test_a_method_keeps_one_name_in_every_registry():
    """A transfer method and a few-label method that change the same parts of the model are one
    method: they carry one name (`norm_patch` keeps the shared head, `norm_head` trains a new one)."""
    for t in TRANSFER:
        for a in ADAPT:
            if a.setting == "few_labels" and a.changes == t.changes:
                assert a.name == t.name, (a.name, t.name)
    assert ADAPT.renamed() == {"head": "head_only"}
    with pytest.raises(Exception, match="'head' is called 'head_only' now"):
        ADAPT["head"]


def test_a_former_name_cannot_name_another_method():
    from isomod.errors import IsomodError
    from isomod.methods.registry import Methods

    registry = Methods("test method")
    registry.register("new", "transfer", "x", formerly=("old",))(lambda t: t)
    for name, formerly in (("old", ()), ("other", ("new",)), ("new", ())):
        with pytest.raises(IsomodError, match="is taken by another test method"):
            registry.register(name, "transfer", "x", formerly=formerly)


def test_results_written_under_former_names_read_under_todays(tmp_path):
    """bench adapt's results from before the renames (`head`, the `default` regime) resume and
    report under `head_only` and `configured`; a resumed run's config then compares equal."""
    import json

    import isomod.bench  # noqa: F401  registers every bench's migration
    from isomod.bench.results import read_results

    old = {"bench": "adapt", "config": {"few_label_methods": ["route", "head"], "methods": ["adabn"],
                                        "regimes": ["default"], "search": {"proxy": "head"}},
           "rows": [{"method": "head", "task": "t", "metric": "test_acc", "value": 0.5, "regime": "default"},
                    {"method": "adabn", "task": "t", "metric": "test_acc", "value": 0.4}],
           "routes": {"default": {"t-s0": {}}},
           "selection": {"tunes": {"head": ["lr_heads"]}, "chosen": {"mnist/head/s0": 1.0, "mnist/route/s0": 3.0}}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(old))
    new = read_results(path)
    assert [r["method"] for r in new["rows"]] == ["head_only", "adabn"] and new["rows"][0]["regime"] == "configured"
    assert new["config"]["few_label_methods"] == ["route", "head_only"] and new["config"]["regimes"] == ["configured"]
    assert new["config"]["search"] == {"proxy": "head"}  # a search proxy of that name is not a method
    assert list(new["routes"]) == ["configured"] and new["selection"]["tunes"] == {"head_only": ["lr_heads"]}
    assert new["selection"]["chosen"] == {"mnist/head_only/s0": 1.0, "mnist/route/s0": 3.0}
