"""scaling.data's digits: scikit-learn's table read without importing scikit-learn, value for value."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from scaling import data
from tests.conftest import REPO


def test_digits_table_is_scikit_learns_load_digits() -> None:
    from sklearn.datasets import load_digits

    images, labels = data.digits_table()
    reference = load_digits()
    assert images.dtype == reference.images.dtype and np.array_equal(images, reference.images)
    assert np.array_equal(labels, reference.target)


def test_loading_digits_does_not_import_scikit_learn() -> None:
    code = ("import sys\nfrom scaling import data\nd = data.load_digits(16, seed=1)\n"
            "assert d.train_x.shape[1:] == (3, 16, 16) and len(d.train_y) + len(d.test_y) == 1797\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'pandas')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
