"""Images per second per loader process of ``--dataset imagenet:PATH``, and how many cores a GPU needs.

    python benchmarks/bench_data.py [--train-images 1024] [--workers 0 1 2] [--augmentation minimal extended]
                                    [--image-size 224] [--batch 32] [--rounds 2] [--keep DIR] [--json FILE]

Writes an ImageNet-like JPEG tree in a temporary folder (train/ and val/ class folders; 500×375, 375×500, 500×333
and 400×300 images, quality 90, ~105 KB mean (ImageNet's: ~110 KB); smooth colour fields plus grain, so
the files are neither trivially compressible nor noise), then reads it the way ``larscale train --dataset
imagenet:PATH`` does: ``scaling.data.imagenet_datasets`` (``ImageFolderData``: decode, random-resized crop,
flip, extended colour jitter, the crop's uint8 bytes, which the device normalises; ``--float-output``: float32
normalisation in the worker, TensorFlow's path), ``ShardBatchSampler`` and a torch ``DataLoader`` with N
worker processes (``prefetch_factor`` 4, as the trainer's loader). Every (augmentation, workers) configuration
runs once per round, in a shuffled order; the report gives the median over rounds of

    images/s of the loader, and images/s per loader process (÷ N; N = 0: the main process decodes)

and images per CPU-second (CPU time of the main process and the workers, which a busy machine's neighbours move
far less than the wall rate); from the one-worker CPU rate of each augmentation, the loader cores one GPU needs
at 4,650 img/s (eager ResNet-50, bf16, H200), 6,720 (the same compiled) and 25,700 (AlexNet-BN eager; it crops
227 px, measured here at --image-size). The files sit in the page cache after the first read: this measures decoding and
augmentation, not the file system. A second table splits one image's cost into its stages (decode, crop and
resize, flip, jitter, normalise) on one thread's CPU clock, to show where a faster loader would save. Prints one
``RESULT {json}`` line. No target: the figures feed benchmarks/README.md and the machine profiles'
``compute.data_images_per_s``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from scaling import data  # noqa: E402

IMAGENET_LIKE_SIZES = ((500, 375), (375, 500), (500, 333), (400, 300))  # the commonest ImageNet shapes
JPEG_QUALITY = 90
GRAIN_SIGMA = 28.0      # grey levels of noise on top of the smooth field: ~105 KB mean (ImageNet ~110 KB)
# Images per second one H200 consumes, bf16, batch 256 / 1024 (measured 2026-11-30 by `benchmarks/bench_gpu.py`'s
# bare_eager_lars and bare_compiled_lars rows; AlexNet-BN with --model alexnet_bn --batch 1024).
GPU_RATES = {"resnet50_eager_h200": 4650.0, "resnet50_compiled_h200": 6720.0, "alexnet_bn_eager_h200": 25700.0}


@dataclass(frozen=True)
class TreeSpec:
    train_images: int
    val_images: int
    classes: int
    seed: int = 0


@dataclass
class LoaderRate:
    augmentation: str
    workers: int
    images_per_s: float        # median over rounds, wall clock
    per_process: float         # images_per_s ÷ max(workers, 1)
    per_cpu_second: float      # median over rounds: images ÷ CPU seconds of the main process and the workers
    rounds: list[float]


def write_jpeg_tree(root: Path, spec: TreeSpec) -> dict[str, float]:
    """train/<class>/*.JPEG and val/<class>/*.JPEG under ``root``; returns the count and mean file size."""
    rng = np.random.default_rng(spec.seed)
    from PIL import Image

    # Grain from a few pre-drawn fields, cut at random offsets: drawing 190k normals per image is the slow part.
    grain_bank = [rng.normal(0.0, GRAIN_SIGMA, size=(1000, 1000, 3)).astype(np.float32) for _ in range(3)]
    sizes = []
    for split, count in (("train", spec.train_images), ("val", spec.val_images)):
        for i in range(count):
            label = i % spec.classes
            width, height = IMAGENET_LIKE_SIZES[int(rng.integers(len(IMAGENET_LIKE_SIZES)))]
            coarse = rng.integers(0, 256, size=(height // 25 + 2, width // 25 + 2, 3), dtype=np.uint8)
            field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
            grain = grain_bank[i % len(grain_bank)]
            top, left = int(rng.integers(0, 1000 - height)), int(rng.integers(0, 1000 - width))
            pixels = np.clip(field + grain[top:top + height, left:left + width], 0, 255).astype(np.uint8)
            folder = root / split / f"n{label:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{split}_{i:06d}.JPEG"
            Image.fromarray(pixels).save(path, "JPEG", quality=JPEG_QUALITY)
            sizes.append(path.stat().st_size)
    return {"files": len(sizes), "mean_kb": float(np.mean(sizes)) / 1e3}


def loader_batches(dataset: data.ImageFolderData, batch: int, workers: int, epoch: int) -> tuple[int, Iterator]:
    """The number of batches of one epoch and the batches, read as ``larscale train`` reads them (one rank, no
    accumulation)."""
    import torch

    sampler = data.ShardBatchSampler(len(dataset), batch, batch, 1, rank=0, seed=0, epoch=epoch)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         persistent_workers=False, prefetch_factor=4 if workers > 0 else None)
    return len(sampler), iter(loader)


class CpuClock:
    """CPU seconds (user + system) this process and its children (the loader workers) spent since ``start``."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()
        self.start: dict[int, float] = {}

    def _now(self) -> dict[int, float]:
        import psutil

        seconds = {}
        for process in [self.me, *self.me.children(recursive=True)]:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            seconds[process.pid] = times.user + times.system
        return seconds

    def begin(self) -> None:
        self.start = self._now()

    def elapsed(self) -> float:
        return sum(total - self.start.get(pid, 0.0) for pid, total in self._now().items())


def time_loader(dataset: data.ImageFolderData, batch: int, workers: int, epoch: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over one epoch, the clocks started once every worker has
    delivered a batch (worker start-up is not the steady rate) and read when the last batch arrives, before
    the workers exit. CPU seconds count this process and the workers: on a busy machine the wall rate measures
    the neighbours too, the CPU rate much less so."""
    skip = max(workers, 1)
    count, batches = loader_batches(dataset, batch, workers, epoch)
    if count <= skip:
        raise SystemExit(f"bench_data: {len(dataset)} training images give {count} batches of {batch}, too few for "
                         f"{workers} workers; raise --train-images")
    cpu, start, images = CpuClock(), 0.0, 0
    for index, (images_batch, _) in enumerate(batches):
        if index == skip - 1:
            cpu.begin()
            start = time.perf_counter()
        elif index >= skip:
            images += images_batch.shape[0]
        if index == count - 1:
            wall, cpu_seconds = time.perf_counter() - start, cpu.elapsed()
    return images / wall, images / cpu_seconds


def stage_breakdown(dataset: data.ImageFolderData, samples: int) -> dict[str, float]:
    """Mean CPU milliseconds per image of each stage of ``ImageFolderData.__getitem__`` (training transform),
    the same PIL and numpy calls timed one by one on this thread's CPU clock (the neighbours do not count)."""
    from PIL import Image, ImageEnhance

    stages = {"decode": 0.0, "crop_resize": 0.0, "flip": 0.0, "colour_jitter": 0.0, "normalise": 0.0}
    size = dataset.image_size
    for index in range(min(samples, len(dataset))):
        rng = np.random.default_rng([dataset.seed, 0, index, 0xA06])
        t0 = time.thread_time()
        with Image.open(dataset.samples[index][0]) as handle:
            image = handle.convert("RGB")
        t1 = time.thread_time()
        scale = (0.25, 1.0) if dataset.augmentation == "minimal" else (0.08, 1.0)
        left, top, w, h = data.random_resized_box(image.width, image.height, rng, scale)
        image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
        t2 = time.thread_time()
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        t3 = time.thread_time()
        if dataset.augmentation == "extended":
            for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
                image = enhance(image).enhance(float(rng.uniform(0.6, 1.4)))
        t4 = time.thread_time()
        if dataset.as_uint8:  # the trainer's path: the device normalises
            np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))
        else:
            array = (np.asarray(image, dtype=np.float32) / 255.0 - data.IMAGENET_MEAN) / data.IMAGENET_STD
            np.ascontiguousarray(array.transpose(2, 0, 1))
        t5 = time.thread_time()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[name] += seconds
    count = min(samples, len(dataset))
    return {name: 1e3 * seconds / count for name, seconds in stages.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=1024, help="JPEGs in train/ (default 1024)")
    parser.add_argument("--classes", type=int, default=16, help="class folders (default 16)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader processes (0 1 2)")
    parser.add_argument("--augmentation", nargs="+", choices=data.AUGMENTATIONS, default=list(data.AUGMENTATIONS))
    parser.add_argument("--image-size", type=int, default=224, help="crop size (default 224)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per configuration (default 2)")
    parser.add_argument("--stage-samples", type=int, default=200, help="images for the stage table (default 200)")
    parser.add_argument("--keep", type=Path, help="write the JPEG tree here and keep it (default: a temp dir)")
    parser.add_argument("--float-output", action="store_true", help="workers normalise to float32 (TensorFlow's "
                        "path) instead of handing uint8 crops to the device (PyTorch's)")
    parser.add_argument("--json", type=Path, help="also write the RESULT object to this file")
    args = parser.parse_args(argv)
    for name in ("train_images", "classes", "image_size", "batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.workers) < 0:
        parser.error(f"--workers must be >= 0, got {min(args.workers)}")
    if args.train_images < args.batch * (max(max(args.workers), 1) + 2):
        parser.error(f"--train-images {args.train_images} is too few for batches of {args.batch} with "
                     f"{max(args.workers)} workers: give at least {args.batch * (max(max(args.workers), 1) + 2)}")

    import torch

    torch.set_num_threads(1)  # one core per process, as a loader worker is
    with tempfile.TemporaryDirectory(prefix="bench_data_") as scratch:
        root = args.keep or Path(scratch)
        started = time.perf_counter()
        tree = write_jpeg_tree(root, TreeSpec(args.train_images, max(2 * args.classes, 32), args.classes))
        print(f"JPEG tree: {tree['files']} files, mean {tree['mean_kb']:.0f} KB, in {root} "
              f"({time.perf_counter() - started:.1f} s to write)")
        spec = data.parse_dataset(f"imagenet:{root}")
        datasets = {aug: data.imagenet_datasets(spec, args.image_size, aug, seed=0, as_uint8=not args.float_output)[0]
                    for aug in args.augmentation}
        for dataset in datasets.values():  # read every file once: the rounds then measure decoding, not the disk
            for path, _ in dataset.samples:
                Path(path).read_bytes()
        configs = [(aug, w) for aug in args.augmentation for w in args.workers]
        measured: dict[tuple[str, int], list[tuple[float, float]]] = {c: [] for c in configs}
        shuffler = random.Random(0)
        for round_index in range(args.rounds):
            order = list(configs)
            shuffler.shuffle(order)
            for aug, workers in order:
                measured[(aug, workers)].append(time_loader(datasets[aug], args.batch, workers, round_index))
        stages = {aug: stage_breakdown(datasets[aug], args.stage_samples) for aug in args.augmentation}

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rates = []
    print(f"\n{args.image_size} px crops, batch {args.batch}, {args.rounds} interleaved rounds, torch "
          f"{torch.__version__}, {os.cpu_count()} cores, load average {load:.1f}")
    print(f"  {'augmentation':<12} {'workers':>7} {'images/s':>10} {'per process':>12} {'per CPU-s':>10}   "
          "wall rate per round")
    for aug, workers in configs:
        walls = [wall for wall, _ in measured[(aug, workers)]]
        median = statistics.median(walls)
        per_cpu = statistics.median(cpu for _, cpu in measured[(aug, workers)])
        rate = LoaderRate(aug, workers, median, median / max(workers, 1), per_cpu, walls)
        rates.append(rate)
        print(f"  {aug:<12} {workers:>7} {median:>10.1f} {rate.per_process:>12.1f} {per_cpu:>10.1f}   "
              + " ".join(f"{r:.1f}" for r in rate.rounds))
    # A core's rate: images per CPU-second with one worker (the trainer's setting: workers do the work, the
    # training process only receives batches), which the neighbours on a shared machine move little.
    per_core = {aug: next((r.per_cpu_second for r in rates if r.augmentation == aug and r.workers == 1),
                          max(r.per_cpu_second for r in rates if r.augmentation == aug))
                for aug in args.augmentation}
    cores = {aug: {gpu: math.ceil(rate / per_core[aug]) for gpu, rate in GPU_RATES.items()}
             for aug in args.augmentation}
    print("\nLoader cores one GPU needs (images per CPU-second with one worker; the training process needs its "
          "own core):")
    print(f"  {'augmentation':<12} {'img/s per core':>15} " + " ".join(f"{g:>24}" for g in GPU_RATES))
    for aug in args.augmentation:
        print(f"  {aug:<12} {per_core[aug]:>15.1f} "
              + " ".join(f"{cores[aug][g]:>13} at {GPU_RATES[g]:>7,.0f}/s" for g in GPU_RATES))
    print("\nOne image's training transform by stage (CPU ms, one thread):")
    print(f"  {'augmentation':<12} " + " ".join(f"{s:>13}" for s in next(iter(stages.values()))) + "      total")
    for aug, by_stage in stages.items():
        print(f"  {aug:<12} " + " ".join(f"{v:>13.2f}" for v in by_stage.values())
              + f" {sum(by_stage.values()):>10.2f}")
    result = {
        "benchmark": "bench_data", "image_size": args.image_size, "batch": args.batch, "rounds": args.rounds,
        "tree": tree, "cores": os.cpu_count(), "load_average": load, "torch": torch.__version__,
        "rates": [asdict(r) for r in rates], "images_per_s_per_core": per_core, "gpu_rates": GPU_RATES,
        "cores_per_gpu": cores, "stage_ms": stages,
    }
    print("RESULT " + json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
