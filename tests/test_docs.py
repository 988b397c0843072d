"""Every docs page's generated tables come from a results file committed beside it, and
regenerate from it byte for byte."""

import shutil
from pathlib import Path

import pytest


DOCS = Path(__file__).parents[1] / "docs" / "results"
PAGES = sorted(p.stem for p in DOCS.glob("*.md") if "isomod report: begin" in p.read_text())


def test_every_docs_page_with_generated_tables_has_its_results_file():
    assert PAGES, "no docs page with generated tables found"
    missing = [p for p in PAGES if not (DOCS / f"{p}.json").is_file()]
    assert not missing, f"docs/results/NAME.json missing for: {', '.join(missing)}"


@pytest.mark.parametrize("page", PAGES)
def test_a_docs_page_regenerates_from_its_committed_results_byte_for_byte(page, tmp_path, monkeypatch, capsys):
    from isomod.cli import main

    if not (DOCS / f"{page}.json").is_file():
        pytest.skip(f"no {page}.json (the test above fails for it)")
    folder = tmp_path / "docs" / "results"
    folder.mkdir(parents=True)
    for suffix in (".md", ".json"):
        shutil.copy(DOCS / f"{page}{suffix}", folder / f"{page}{suffix}")
    monkeypatch.chdir(tmp_path)
    assert main(["report", f"docs/results/{page}.json", "--docs", f"docs/results/{page}.md"]) == 0
    assert (folder / f"{page}.md").read_text() == (DOCS / f"{page}.md").read_text()


def test_report_of_a_results_file_needs_a_destination(tmp_path, capsys):
    from isomod.bench.results import Results, Row
    from isomod.cli import main

    res = Results(tmp_path / "r.json", "reuse", {})
    res.add(Row("once", "t", "test_acc", 0.5, {"seed": 0, "N": 2, "L": 2, "params_total": 1, "params_task": 1}))
    res.save()
    assert main(["report", str(tmp_path / "r.json")]) == 2
    assert "give --out DIR for the report and figures, or --docs PAGE" in capsys.readouterr().err
