"""Preprocessed-data storage: plain .npy against autoseg's compressed, chunked .b2nd store.

    python benchmarks/bench_store.py                      # BraTS (2 cases) and Hippocampus (4 cases)
    python benchmarks/bench_store.py --compare            # also other codecs, levels and chunk layouts
    python benchmarks/bench_store.py --preprocessed WORKDIR/preprocessed/3d_fullres --cases 5
    python benchmarks/bench_store.py --synthetic 1x20x24x22 --reads 3   # seconds; the test suite runs this

For each group of cases it writes both formats into a temporary folder and prints: disk size and
ratio to .npy, seconds to write a case, milliseconds to load a whole image, and random patches per
second for each patch size. A patch is read exactly as training reads it
(`patch_sampling.sample_patch_box` at a random position, then `read_box` of image and seg), so a
figure covers both arrays. Patch rates are given in CPU time of this process (blosc2 decompresses
with one thread, so this is the cost on one loader worker and shifts little with other load on the
machine) and in wall time. The .npy files have just been written, so they are read from the page
cache: the figures for .npy are the best case, a cold disk only slows .npy down (it reads 2-3 times
more bytes).

Input cases (default): the first cases of `--dataset` folders (default: BraTS 2013 subset and
Hippocampus from ../shared/datasets), made to look like autoseg's preprocessed data without a plan:
cropped to the hole-filled foreground mask (BraTS's constant background counts as empty), z-scored
inside it with 0 outside, seg -1 outside the mask. Both datasets are at 1 mm, which is their
target spacing, so no resampling is needed. `--preprocessed DIR` reads real preprocessed cases
instead (either format), and `--synthetic CxZxYxX` makes smooth random volumes of that shape.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import blosc2
import numpy as np
from scipy import ndimage

from autoseg.preprocessing import store
from autoseg.training.patch_sampling import read_box, sample_patch_box

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = [REPO.parent / "shared" / "datasets" / "Dataset002_BraTS2013Subset",
                    REPO.parent / "shared" / "datasets" / "Task04_Hippocampus"]
DEFAULT_CASES = {"Dataset002_BraTS2013Subset": 2, "Task04_Hippocampus": 4}
DEFAULT_PATCHES = ["40x56x40", "128x128x128", "1x160x128"]

# Alternatives for --compare: (name, save_array keyword arguments); a "spatial" pair is (blocks, chunks)
# for the spatial axes, completed with all channels and clipped to the array.
VARIANTS = [
    ("store default (ZSTD 3, 3D layout)", {}),
    ("ZSTD 1", {"clevel": 1}),
    ("ZSTD 8 (nnU-Net's level)", {"clevel": 8}),
    ("LZ4 5", {"codec": blosc2.Codec.LZ4, "clevel": 5}),
    ("LZ4HC 5", {"codec": blosc2.Codec.LZ4HC, "clevel": 5}),
    ("blocks 16^3, chunks 64^3", {"spatial": ((16, 16, 16), (64, 64, 64))}),
    ("blocks 16x32x32, chunks 64x128x128", {"spatial": ((16, 32, 32), (64, 128, 128))}),
    ("blocks 32^3, chunks 128^3", {"spatial": ((32, 32, 32), (128, 128, 128))}),
    ("blosc2 automatic chunks/blocks", {"spatial": "auto"}),
    ("2D layout (store, 2D patch)", {"patch_size": (1, 1)}),
]


@dataclass
class Group:
    name: str
    cases: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)


def machine() -> str:
    """The shared machine line, and the library versions blosc2's codecs depend on."""
    return f"{_machine.machine()}; numpy {np.__version__}, blosc2 {blosc2.__version__}"


def preprocessed_like(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop to the foreground mask, z-score inside it (0 outside), seg -1 outside: like preprocessing's output."""
    background = image[:, :1, :1, :1]
    if (image == background).mean() < 0.1:  # no constant background: empty means zero, as in preprocessing
        background = np.zeros_like(background)
    mask = ndimage.binary_fill_holes(np.any(image != background, axis=0))
    where = np.argwhere(mask)
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(where.min(0), where.max(0)))
    image, label, mask = image[(slice(None),) + box].astype(np.float32), label[box], mask[box]
    for channel in image:
        values = channel[mask]
        channel[...] = (channel - values.mean()) / max(float(values.std()), 1e-8)
        channel[~mask] = 0
    seg = label.astype(np.int8 if label.max() <= 127 else np.int16)[None]
    seg[0][(seg[0] == 0) & ~mask] = -1
    return image, seg


def groups_from_datasets(roots: list[Path], max_cases: int | None) -> list[Group]:
    from autoseg.dataset.layout import load_dataset, read_case_image, read_case_label

    groups = []
    for root in roots:
        dataset = load_dataset(root)
        group = Group(dataset.name)
        for case in dataset.cases[:max_cases or DEFAULT_CASES.get(root.name, 2)]:
            image, _ = read_case_image(case, dataset.num_channels)
            group.cases.append(preprocessed_like(image, read_case_label(case)))
        groups.append(group)
    return groups


def group_from_preprocessed(folder: Path, max_cases: int | None) -> Group:
    group = Group(folder.name)
    for case_id in store.list_cases(folder)[:max_cases or 4]:
        _, seg = store.open_case_arrays(folder, case_id)
        group.cases.append((store.load_case_image(folder, case_id), np.asarray(seg[...])))
    if not group.cases:
        raise SystemExit(f"{folder}: no complete preprocessed cases")
    return group


def synthetic_group(shape: list[int], num_cases: int) -> Group:
    rng = np.random.default_rng(0)
    group = Group("synthetic " + "x".join(map(str, shape)))
    for _ in range(num_cases):
        image = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 2, 2, 2)).astype(np.float32)
        image += 0.05 * rng.normal(size=shape).astype(np.float32)
        seg = (image[:1] > 0.1).astype(np.int8) + (image[:1] > 0.3)
        seg[:, :, :2] = -1
        group.cases.append((image, seg))
    return group


def write_npy(folder: Path, group: Group) -> tuple[float, int]:
    start = time.perf_counter()
    for i, (image, seg) in enumerate(group.cases):
        np.save(folder / f"c{i}.npy", image)
        np.save(folder / f"c{i}_seg.npy", seg)
    seconds = time.perf_counter() - start
    return seconds, sum(p.stat().st_size for p in folder.glob("*.npy"))


def _layout_overrides(array: np.ndarray, options: dict) -> dict:
    options = dict(options)
    spatial = options.pop("spatial", None)
    if spatial == "auto":  # blosc2 picks both from its own cache heuristics
        return {**options, "chunks": None, "blocks": None, "_auto": True}
    if spatial is not None:
        blocks, chunks = spatial
        chunks = (array.shape[0],) + tuple(min(c, s) for c, s in zip(chunks, array.shape[1:]))
        blocks = (array.shape[0],) + tuple(min(b, c) for b, c in zip(blocks, chunks[1:]))
        options.update(chunks=chunks, blocks=blocks)
    return options


def _save(path: Path, array: np.ndarray, options: dict) -> None:
    options = _layout_overrides(array, options)
    if options.pop("_auto", False):
        cparams = blosc2.CParams(codec=options.get("codec", store.CODEC), clevel=options.get("clevel", store.CLEVEL),
                                 nthreads=1)
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(path), mode="w", cparams=cparams)
        return
    store.save_array(path, array, **options)


def write_b2nd(folder: Path, group: Group, options: dict) -> tuple[float, int]:
    start = time.perf_counter()
    for i, (image, seg) in enumerate(group.cases):
        _save(folder / f"c{i}.b2nd", image, options)
        _save(folder / f"c{i}_seg.b2nd", seg, options)
    seconds = time.perf_counter() - start
    return seconds, sum(p.stat().st_size for p in folder.glob("*.b2nd"))


def open_arrays(folder: Path, n: int, suffix: str) -> list[tuple[object, object]]:
    if suffix == ".npy":
        return [(np.load(folder / f"c{i}.npy", mmap_mode="r"), np.load(folder / f"c{i}_seg.npy", mmap_mode="r"))
                for i in range(n)]
    return [(store.open_array(folder / f"c{i}.b2nd"), store.open_array(folder / f"c{i}_seg.b2nd")) for i in range(n)]


def patch_rate(arrays: list[tuple[object, object]], patch: list[int], reads: int, seed: int = 0) -> tuple[float, float]:
    """(patches per CPU second, patches per wall second) of random image+seg patches, as training reads them."""
    rng = np.random.default_rng(seed)
    boxes = []
    for _ in range(reads):
        image, seg = arrays[int(rng.integers(len(arrays)))]
        boxes.append((image, seg, *sample_patch_box(image.shape[1:], patch, rng, None, {})))
    cpu, wall = time.process_time(), time.perf_counter()
    for image, seg, lower, upper in boxes:
        for patch_array in (read_box(image, lower, upper), read_box(seg, lower, upper, pad_value=-1)):
            if not patch_array.flags.owndata:  # a view into a memory map: copy, as batching does
                patch_array.copy()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return reads / max(cpu, 1e-9), reads / max(wall, 1e-9)


def full_load_ms(folder: Path, n: int, suffix: str) -> float:
    start = time.perf_counter()
    for i in range(n):
        if suffix == ".npy":
            np.load(folder / f"c{i}.npy")
        else:
            store.open_array(folder / f"c{i}.b2nd")[...]
    return (time.perf_counter() - start) / n * 1000


def measure(folder: Path, group: Group, suffix: str, options: dict, patches: list[list[int]], reads: int) -> dict:
    folder.mkdir()
    seconds, size = write_npy(folder, group) if suffix == ".npy" else write_b2nd(folder, group, options)
    arrays = open_arrays(folder, len(group.cases), suffix)
    rates = [patch_rate(arrays, patch, max(1, reads if min(patch) < 128 else reads // 4)) for patch in patches]
    return {"size": size, "write": seconds / len(group.cases), "full": full_load_ms(folder, len(group.cases), suffix),
            "rates": rates}


def bench_group(group: Group, tmp: Path, patches: list[list[int]], reads: int, compare: bool) -> None:
    shapes = ", ".join("x".join(map(str, image.shape)) for image, _ in group.cases)
    seg_types = sorted({str(seg.dtype) for _, seg in group.cases})
    print(f"\n## {group.name}: {len(group.cases)} cases, image (C,Z,Y,X) {shapes} float32, seg {'/'.join(seg_types)}")
    labels = ["x".join(map(str, p)) for p in patches]
    print(f"{'format':36s} {'MB':>8s} {'ratio':>6s} {'write s/case':>12s} {'full load ms':>12s}   "
          + "   ".join(f"{label + ' patches/s cpu|wall':>30s}" for label in labels))
    runs = [("npy (memory-mapped, page cache)", ".npy", {})]
    runs += [(name, ".b2nd", options) for name, options in (VARIANTS if compare else VARIANTS[:1])]
    npy_size = None
    for k, (name, suffix, options) in enumerate(runs):
        result = measure(tmp / f"{group.name.replace(' ', '_')}_{k}", group, suffix, options, patches, reads)
        npy_size = npy_size or result["size"]
        rates = "   ".join(f"{cpu:>17.1f} | {wall:>10.1f}" for cpu, wall in result["rates"])
        print(f"{name:36s} {result['size'] / 1e6:8.2f} {npy_size / result['size']:6.2f} {result['write']:12.3f} "
              f"{result['full']:12.1f}   {rates}", flush=True)


def parse_shape(text: str) -> list[int]:
    try:
        return [int(v) for v in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 40x56x40, got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--dataset", type=Path, nargs="+",
                        help="raw dataset folders (default: BraTS subset, Hippocampus)")
    source.add_argument("--preprocessed", type=Path, help="an autoseg preprocessed folder (either format)")
    source.add_argument("--synthetic", type=parse_shape, metavar="CxZxYxX", help="smooth random volumes of this shape")
    parser.add_argument("--cases", type=int, help="cases per group (default: BraTS 2, Hippocampus 4, synthetic 2)")
    parser.add_argument("--patches", type=parse_shape, nargs="+", default=[parse_shape(p) for p in DEFAULT_PATCHES],
                        metavar="ZxYxX",
                        help=f"patch sizes (default: {' '.join(DEFAULT_PATCHES)}; 1xYxX is a 2D patch)")
    parser.add_argument("--reads", type=int, default=60, help="random patches per size (a quarter for 128^3 and up)")
    parser.add_argument("--compare", action="store_true", help="also time other codecs, levels and chunk layouts")
    parser.add_argument("--tmp-dir", type=Path, help="where to write (default: the system's temporary folder)")
    args = parser.parse_args(argv)

    print(f"Machine: {machine()}")
    print(f"Store: {store.CODEC.name} clevel {store.CLEVEL}, 3D blocks {store.BLOCKS_3D} chunks {store.CHUNKS_3D}, "
          f"2D blocks {store.BLOCKS_2D} chunks {store.CHUNKS_2D} (all channels in each)")
    if args.synthetic:
        if len(args.synthetic) != 4:
            parser.error("--synthetic needs 4 sizes, CxZxYxX")
        groups = [synthetic_group(args.synthetic, args.cases or 2)]
    elif args.preprocessed:
        groups = [group_from_preprocessed(args.preprocessed, args.cases)]
    else:
        groups = groups_from_datasets(args.dataset or DEFAULT_DATASETS, args.cases)
    with tempfile.TemporaryDirectory(dir=args.tmp_dir, prefix="bench_store_") as tmp:
        for group in groups:
            bench_group(group, Path(tmp), args.patches, args.reads, args.compare)


if __name__ == "__main__":
    sys.exit(main())
