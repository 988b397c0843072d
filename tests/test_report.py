"""Report maths: route similarity, means recomputed from per-task rows, the table."""

import json

import numpy as np
import pytest

from isomod.bench.report import markdown_results, mean_table, route_similarity, seed_means


def test_route_similarity_of_discrete_routes():
    eye = np.eye(4)
    usage = {"a": eye[[0, 1, 2, 3]], "b": eye[[0, 1, 3, 3]], "c": eye[[1, 0, 0, 0]]}
    names, sim = route_similarity(usage)
    assert names == ["a", "b", "c"]
    assert np.allclose(np.diag(sim), 1.0)
    assert sim[0, 1] == 0.75 and sim[0, 2] == 0.0 and sim[1, 0] == sim[0, 1]


def rows():
    out = []
    for seed, (a, b) in enumerate([(0.8, 0.6), (0.6, 0.4)]):
        for task, v in (("t1", a), ("t2", b)):
            out.append({"method": "m", "task": task, "metric": "test_acc", "value": v, "params_total": 100,
                        "params_task": 10, "seed": seed})
        out.append({"method": "m", "task": "mean", "metric": "test_acc", "value": 0.0, "params_total": 100,
                    "params_task": 10, "seed": seed})  # a stale mean row is ignored, never trusted
    return out


def test_means_are_recomputed_from_per_task_rows():
    table = mean_table(rows())
    assert table["m"] == pytest.approx({"t1": 0.7, "t2": 0.5, "mean": 0.6})
    assert seed_means(rows()) == {"m": pytest.approx({0: 0.7, 1: 0.5})}
    text = markdown_results(rows())
    assert "| **mean** | **60.0** |" in text and "| mean, each seed | 70.0 / 50.0 |" in text
    assert "| params total | 100 |" in text


def test_rows_made_after_a_sitting_that_made_none_carry_their_own_environment(tmp_path):
    """A bench stopped before its first row (say, while pre-training) and resumed on other
    code: its rows name the code that made them, not the first sitting's."""
    from isomod.bench.results import Results, Row

    path, a, b = tmp_path / "results.json", {"commit": "aaa", "threads": 1}, {"commit": "bbb", "threads": 1}
    Results(path, "b", {"k": 1}, environment=a).save()
    later = Results(path, "b", {"k": 1}, resume=True, environment=b)
    later.add(Row("m", "t", "test_acc", 0.5, {"seed": 0}))
    data = json.loads(later.save().read_text())
    assert data["environment"] == b and "sittings" not in data


def test_a_run_resumed_elsewhere_records_which_rows_each_sitting_made(tmp_path):
    from isomod.bench.docs import write_docs
    from isomod.bench.results import Results, Row, read_results
    from isomod.errors import IsomodError

    path, a, b = tmp_path / "results.json", {"commit": "aaa", "threads": 1}, {"commit": "bbb", "threads": 1}
    first = Results(path, "b", {"k": 1}, environment=a)
    first.add(Row("m", "t", "test_acc", 0.5, {"seed": 0}), Row("m", "t", "test_acc", 0.6, {"seed": 1}))
    first.save()
    assert "sittings" not in Results(path, "b", {"k": 1}, resume=True, environment=b).save().read_text()
    again = Results(path, "b", {"k": 1}, resume=True, environment=a)  # the same environment: one sitting
    again.add(Row("m", "t", "test_acc", 0.7, {"seed": 2}))
    again.save()
    later = Results(path, "b", {"k": 1}, resume=True, environment=b)
    later.add(Row("m", "t", "test_acc", 0.8, {"seed": 3}))
    later.save()
    data = json.loads(path.read_text())
    assert data["sittings"] == [{"environment": a, "first_row": 0}, {"environment": b, "first_row": 3}]
    page = tmp_path / "page.md"
    write_docs(page, str(path), data, "TABLE")
    assert "(rows 1-3: commit aaa, threads 1; rows 4-4: commit bbb, threads 1)" in page.read_text()
    data["sittings"] = [{"environment": a, "first_row": "0"}]
    path.write_text(json.dumps(data))
    with pytest.raises(IsomodError, match="'sittings' must be a list of objects with an integer 'first_row'"):
        read_results(path)


def test_results_save_atomically_and_resume_only_the_same_config(tmp_path):
    from isomod.bench.results import Results, Row

    path = tmp_path / "results.json"
    res = Results(path, "b", {"k": 1}, extra={})
    res.add(Row("m", "t", "test_acc", 0.5, {"seed": 0}))
    res.save()
    assert Results(path, "b", {"k": 1}, resume=True).has(method="m", seed=0)
    assert Results(path, "b", {"k": 2}, resume=True).rows == []
    # Another number of runs side by side resumes; any other change does not.
    Results(path, "b", {"k": 1, "jobs": 1}, extra={}).save()
    res = Results(path, "b", {"k": 1, "jobs": 1}, resume=True)
    res.add(Row("m", "t", "test_acc", 0.5, {"seed": 0}))
    res.save()
    assert Results(path, "b", {"k": 1, "jobs": 2}, resume=True).has(method="m", seed=0)
    assert Results(path, "b", {"k": 2, "jobs": 1}, resume=True).rows == []
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
    with pytest.raises(Exception, match=r"a result row is a Row \(method, task, metric, value and fields\), got dict"):
        res.add({"method": "m", "task": "t", "metric": "x"})



def test_md_table_aligns_columns_and_refuses_a_ragged_row():
    from isomod.bench.docs import md_table

    assert md_table(["a", "b"], [[1, "x"], ["", 2.5]], "lr") == ["| a | b |", "|---|---:|", "| 1 | x |", "|  | 2.5 |"]
    with pytest.raises(ValueError, match="a table row of 1 cells under 2 columns"):
        md_table(["a", "b"], [[1]], "lr")
    with pytest.raises(ValueError, match="one of 'l' or 'r' per column"):
        md_table(["a", "b"], [], "lc")


def test_every_report_table_goes_through_md_table():
    """No bench assembles a markdown table's alignment row by hand (19 did, in 7 files)."""
    from pathlib import Path

    bench = Path(__file__).parents[1] / "src" / "isomod" / "bench"
    by_hand = [f"{p.name}:{i}" for p in sorted(bench.glob("*.py")) if p.name != "docs.py"
               for i, line in enumerate(p.read_text().splitlines(), 1) if '"|---' in line or "'|---" in line]
    assert not by_hand, f"tables written by hand: {by_hand}; use isomod.bench.docs.md_table"
