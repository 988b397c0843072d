"""The pool the package ships (`pretrained:glyphs`): the file is the one its card describes,
small, and as accurate as recorded."""

import torch

from isomod import IsomodError, load_checkpoint
from isomod.data.tasks import TaskData, load_task
from isomod.io.checkpoint import PRETRAINED, shipped
from isomod.training.trainer import evaluate

FINGERPRINT = "9160d8e29ae2690628a5c78a4a084cec546fc01b53ab8a1088670812baf3b518"


def test_the_shipped_pool_is_the_one_its_card_names_and_small():
    assert "glyphs" in shipped()
    folder = PRETRAINED / "glyphs"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2 * 1024 * 1024
    model = load_checkpoint("pretrained:glyphs")
    assert model.pool_fingerprint() == FINGERPRINT
    assert FINGERPRINT in (folder / "card.md").read_text()
    assert len(model.task_names) == 9 and "mnist" in model.task_names


def test_the_shipped_pool_recognises_its_glyph_digits():
    model = load_checkpoint("pretrained:glyphs").eval()
    t = load_task("glyphs/digits")
    first = TaskData(t.spec, t.x_train[:0], t.y_train[:0], t.x_test[:200], t.y_test[:200])
    assert abs(evaluate(model, {t.name: first})[t.name] - 0.975) <= 0.01  # recorded on the machine that packed it


def test_an_unknown_pretrained_pool_is_a_one_line_error(capsys):
    from isomod.cli import main

    try:
        load_checkpoint("pretrained:nope")
    except IsomodError as exc:
        assert "no pretrained pool 'nope'; shipped: glyphs" in str(exc)
    else:
        raise AssertionError("an unknown pretrained pool loaded")
    assert main(["eval", "--from", "pretrained:nope"]) == 2
    assert "no pretrained pool 'nope'" in capsys.readouterr().err
    assert main(["eval", "--from", "pretrained:glyphs", "--tasks", "glyphs/digits", "--limit", "50"]) == 0
    assert capsys.readouterr().out.startswith("glyphs/digits: test acc")
    assert torch.is_tensor(load_checkpoint("pretrained:glyphs").stem.weight)
