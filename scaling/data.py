"""Training data: synthetic tensors, scikit-learn's digits, and ImageNet-style JPEG folders; sharded per rank.

Data order. Epoch ``e`` visits the training set in the permutation ``π_e = permutation(N)`` drawn from a
generator seeded with ``(seed, e)``; nothing about the order is stored, so a resumed run recomputes it.
Global step ``k`` of the epoch takes the ``G`` samples ``π_e[k·G : (k+1)·G]`` (the last ``N mod G`` samples are
dropped, so every step has a full batch); rank ``r`` of ``p`` reads its contiguous share
``[r·b·A, (r+1)·b·A)`` of them, split into ``A`` micro-batches of ``b`` (accumulation). The union over
ranks is the same global batch whatever ``p`` is, which is what makes 2 ranks × b equal to 1 rank × 2b.

Augmentation randomness is drawn per sample from a generator seeded with ``(seed, epoch, index)``, so it
does not depend on worker processes, their scheduling, or where a run was resumed.

Synthetic data is generated once per rank on the device (normal images, uniform labels): no I/O in the step.
An "epoch" of synthetic data is ImageNet-1k's 1,281,167 images, so ``--epochs`` means the same work.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGENET_TRAIN_IMAGES = 1_281_167
IMAGENET_CLASSES = 1000
DIGITS_CLASSES = 10
# Per-channel statistics of ImageNet in [0, 1] RGB, used to normalise JPEG inputs.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
AUGMENTATIONS = ("minimal", "extended")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


class DataError(ValueError):
    """A dataset specification or folder that cannot be used; the message names it."""


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # synthetic | digits | imagenet
    path: Path | None = None

    @property
    def name(self) -> str:
        return f"imagenet:{self.path}" if self.kind == "imagenet" else self.kind


def parse_dataset(spec: str) -> DatasetSpec:
    """``synthetic``, ``digits`` or ``imagenet:PATH`` (PATH holding train/ and val/ class folders)."""
    if spec in ("synthetic", "digits"):
        return DatasetSpec(spec)
    if spec.startswith("imagenet:"):
        path = Path(spec.split(":", 1)[1]).expanduser()
        if not str(path) or spec == "imagenet:":
            raise DataError("imagenet dataset needs a path: --dataset imagenet:/path/to/imagenet")
        if not path.is_dir():
            raise DataError(f"imagenet data path {path} does not exist or is not a directory")
        for split in ("train", "val"):
            if not (path / split).is_dir():
                raise DataError(f"imagenet data path {path} lacks the {split}/ folder "
                                "(expected train/<class>/*.JPEG and val/<class>/*.JPEG)")
        return DatasetSpec("imagenet", path)
    raise DataError(f"unknown dataset {spec!r}; choose synthetic, digits or imagenet:PATH")


# ---------------------------------------------------------------- order and sharding


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of range(n) determined by (seed, epoch) alone."""
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def steps_per_epoch(n: int, global_batch: int) -> int:
    if n < global_batch:
        raise DataError(f"the training set has {n} samples, fewer than the global batch {global_batch}")
    return n // global_batch


def rank_micro_batches(perm: np.ndarray, step_in_epoch: int, global_batch: int, rank: int,
                       batch_per_rank: int, accumulation: int) -> list[np.ndarray]:
    """Indices rank ``rank`` reads at ``step_in_epoch``: ``accumulation`` micro-batches of ``batch_per_rank``."""
    share = batch_per_rank * accumulation
    start = step_in_epoch * global_batch + rank * share
    mine = perm[start:start + share]
    if len(mine) != share:
        raise DataError(f"step {step_in_epoch} runs past the end of the epoch ({len(perm)} samples)")
    return [mine[j * batch_per_rank:(j + 1) * batch_per_rank] for j in range(accumulation)]


# ---------------------------------------------------------------- digits


def upsample_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Resize (N, h, w) images to (N, size, size) by bilinear interpolation (pixel centres aligned)."""
    n, h, w = images.shape

    def axis(in_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(size) + 0.5) * in_len / size - 0.5
        src = np.clip(src, 0, in_len - 1)
        lo = np.floor(src).astype(np.int64)
        hi = np.minimum(lo + 1, in_len - 1)
        return lo, hi, (src - lo).astype(np.float32)

    y0, y1, wy = axis(h)
    x0, x1, wx = axis(w)
    rows = images[:, y0, :] * (1 - wy)[None, :, None] + images[:, y1, :] * wy[None, :, None]
    return rows[:, :, x0] * (1 - wx)[None, None, :] + rows[:, :, x1] * wx[None, None, :]


@dataclass
class ArrayData:
    """A small in-memory dataset (NCHW float32 images, int64 labels), split into train and test."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int


def digits_table() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as its ``load_digits`` reads them (8×8 float64 images 0-16, labels), from the table it
    ships (``sklearn/datasets/data/digits.csv.gz``: 64 pixel columns, then the label) without importing
    scikit-learn: that import (SciPy, pandas) was a second of every rank's start-up. Another layout of the package
    falls back to its loader."""
    spec = importlib.util.find_spec("sklearn")           # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the digits dataset comes with scikit-learn, which is not installed: pip install scikit-learn")
    table = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if not table.is_file():
        from sklearn.datasets import load_digits as sk_digits

        bunch = sk_digits()
        return bunch.images, bunch.target
    with gzip.open(table, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits(image_size: int, seed: int, test_fraction: float = 0.2) -> ArrayData:
    """scikit-learn's 1,797 8×8 digits, scaled to [0, 1], standardised, upsampled to ``image_size`` and
    repeated over 3 channels; the train/test split is a permutation drawn from ``seed``."""
    if image_size < 8:
        raise DataError(f"digits are 8×8; --image-size must be >= 8, got {image_size}")
    raw_images, raw_labels = digits_table()
    images = raw_images.astype(np.float32) / 16.0
    images = (images - images.mean()) / images.std()
    images = upsample_bilinear(images, image_size).astype(np.float32)
    images = np.repeat(images[:, None, :, :], 3, axis=1)
    labels = raw_labels.astype(np.int64)
    order = np.random.default_rng([seed, 0xD161]).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return ArrayData(np.ascontiguousarray(images[train]), labels[train], np.ascontiguousarray(images[test]),
                     labels[test], DIGITS_CLASSES)


def eval_shard(n: int, rank: int, ranks: int) -> np.ndarray:
    """Rank ``rank``'s evaluation samples: every ``ranks``-th one, so all samples are counted exactly once."""
    return np.arange(rank, n, ranks)


# ---------------------------------------------------------------- JPEG folders


def list_image_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) for every image under root/<class>/; classes sorted by name unless given."""
    if classes is None:
        classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    if not classes:
        raise DataError(f"{root} holds no class folders")
    samples = []
    for index, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for dirpath, _, files in os.walk(folder):
            samples.extend((os.path.join(dirpath, f), index) for f in sorted(files) if f.endswith(IMAGE_SUFFIXES))
    if not samples:
        raise DataError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    samples.sort()
    return samples, list(classes)


def random_resized_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A crop box (left, top, w, h) covering a random area fraction in ``scale`` with aspect in ``ratio``
    (log-uniform); after 10 failed draws, the largest centred box of the clamped aspect."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
        w = int(round(np.sqrt(target * aspect)))
        h = int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageFolderData:
    """JPEG folder dataset returning (CHW image, label); indexable by (index, epoch).

    The image is float32 and normalised by default (TensorFlow's path), or ``as_uint8``: the crop's bytes, which
    PyTorch's loader workers hand over and the device normalises (:meth:`scaling.framework_torch.TorchData`): a
    worker then skips the float conversion and passes a quarter of the bytes between processes, the two costs
    that came after decoding and resizing in benchmarks/bench_data.py.

    Training transform, ``minimal`` augmentation (the LARS paper's): random-resized crop with area fraction in
    [0.25, 1] and a horizontal flip. ``extended`` adds scale augmentation down to 8 % of the area (Inception
    crops) and colour jitter (brightness, contrast, saturation ±40 %). Evaluation: resize the shorter side to
    size·256/224 and take the central size×size crop.
    """

    def __init__(self, root: Path, image_size: int, train: bool, augmentation: str, seed: int,
                 classes: Sequence[str] | None = None, as_uint8: bool = False) -> None:
        if augmentation not in AUGMENTATIONS:
            raise DataError(f"unknown augmentation {augmentation!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.samples, self.classes = list_image_folder(root, classes)
        self.image_size, self.train, self.augmentation, self.seed = image_size, train, augmentation, seed
        self.as_uint8 = as_uint8

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[np.ndarray, int]:
        from PIL import Image, ImageEnhance

        index, epoch = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        with Image.open(path) as handle:
            image = handle.convert("RGB")
        size = self.image_size
        if self.train:
            rng = np.random.default_rng([self.seed, epoch, index, 0xA06])
            scale = (0.25, 1.0) if self.augmentation == "minimal" else (0.08, 1.0)
            left, top, w, h = random_resized_box(image.width, image.height, rng, scale)
            image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if self.augmentation == "extended":
                for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                    image = enhance(image).enhance(float(rng.uniform(0.6, 1.4)))
        else:
            short = int(round(size * 256 / 224))
            scale_factor = short / min(image.width, image.height)
            image = image.resize((max(size, round(image.width * scale_factor)),
                                  max(size, round(image.height * scale_factor))), Image.BILINEAR)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            image = image.crop((left, top, left + size, top + size))
        if self.as_uint8:
            return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)), label
        array = np.asarray(image, dtype=np.float32) / 255.0
        array = (array - IMAGENET_MEAN) / IMAGENET_STD
        return np.ascontiguousarray(array.transpose(2, 0, 1)), label

    def batch(self, keys: Sequence[int | tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        items = [self[k] for k in keys]
        return np.stack([x for x, _ in items]), np.array([y for _, y in items], dtype=np.int64)


class ShardBatchSampler:
    """Micro-batches of (index, epoch) keys this rank reads, from ``start_step`` of ``epoch`` to its end.

    A torch DataLoader ``batch_sampler`` (it only needs ``__iter__`` and ``__len__``).
    """

    def __init__(self, n: int, global_batch: int, batch_per_rank: int, accumulation: int, rank: int, seed: int,
                 epoch: int, start_step: int = 0) -> None:
        self.n, self.global_batch, self.batch_per_rank = n, global_batch, batch_per_rank
        self.accumulation, self.rank, self.seed, self.epoch, self.start_step = (
            accumulation, rank, seed, epoch, start_step)
        self.steps = steps_per_epoch(n, global_batch)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.accumulation

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm = epoch_permutation(self.n, self.seed, self.epoch)
        for step in range(self.start_step, self.steps):
            for micro in rank_micro_batches(perm, step, self.global_batch, self.rank, self.batch_per_rank,
                                            self.accumulation):
                yield [(int(i), self.epoch) for i in micro]


def imagenet_datasets(spec: DatasetSpec, image_size: int, augmentation: str, seed: int, as_uint8: bool = False
                      ) -> tuple[ImageFolderData, ImageFolderData]:
    assert spec.path is not None
    train = ImageFolderData(spec.path / "train", image_size, True, augmentation, seed, as_uint8=as_uint8)
    val = ImageFolderData(spec.path / "val", image_size, False, augmentation, seed, classes=train.classes,
                          as_uint8=as_uint8)
    return train, val


def synthetic_arrays(batch: int, image_size: int, num_classes: int, seed: int, rank: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """One rank's fixed synthetic batch (used by the TF path; the torch path draws it on the device)."""
    rng = np.random.default_rng([seed, rank, 0x5A])
    images = rng.standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    return images, rng.integers(0, num_classes, size=batch).astype(np.int64)
