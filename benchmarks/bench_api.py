"""Per-case latency of the Python API after one model load, against `autoseg predict` started per case.

    python benchmarks/bench_api.py WORKDIR_OR_MODEL_ZIP -i CASE_FILE [CASE_FILE ...] [--repeat 2] [--cli-cases 3]
                                   [--folds 0] [--no-mirroring]

The API side loads the model once (`autoseg.api.load_model`, timed), segments the first file once as
warm-up, then every file `--repeat` times; printed: load seconds, warm-up seconds, median and
maximum seconds per case after it. The command-line side runs `autoseg predict` as a new process
for each of the first `--cli-cases` files alone (what a service calling the CLI per request pays:
interpreter and torch start-up, weight loading, the case), timed from launch to exit; printed:
median seconds per case and the ratio to the API's median. Both use the same folds and settings, and
the API's labels are checked equal to the CLI's.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="a workspace with trained folds, or a model archive")
    parser.add_argument("-i", "--input", type=Path, nargs="+", required=True, help="one-file cases to segment")
    parser.add_argument("--repeat", type=int, default=2, help="API calls per file after warm-up (default: 2)")
    parser.add_argument("--cli-cases", type=int, default=3, help="files run through `autoseg predict` (default: 3)")
    parser.add_argument("--folds", nargs="+", default=None, help="folds (default: every trained fold)")
    parser.add_argument("--no-mirroring", action="store_true", help="test-time mirroring off on both sides")
    args = parser.parse_args(argv)

    import autoseg.api
    from autoseg.dataset.image_io import image_suffix, read_image

    started = time.perf_counter()
    model = autoseg.api.load_model(args.model, folds=args.folds, mirroring=not args.no_mirroring)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    model.segment_file(args.input[0])
    warm_s = time.perf_counter() - started
    api_s, api_labels = [], {}
    for _ in range(args.repeat):
        for path in args.input:
            started = time.perf_counter()
            api_labels[path] = model.segment_file(path).labels
            api_s.append(time.perf_counter() - started)

    cli_s, same = [], True
    with tempfile.TemporaryDirectory(prefix="bench_api_") as tmp:
        flag = "--model" if args.model.is_file() else None
        for i, path in enumerate(args.input[: args.cli_cases]):
            out = Path(tmp) / f"out{i}"
            command = [sys.executable, "-m", "autoseg.cli", "predict", *([flag, str(args.model)] if flag else
                                                                        [str(args.model)]),
                       "-i", str(path), "-o", str(out), "--no-report",
                       *(["--folds", *args.folds] if args.folds else []),
                       *(["--no-mirroring"] if args.no_mirroring else [])]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            cli_s.append(time.perf_counter() - started)
            written = next(p for p in out.iterdir() if image_suffix(p) and "_instances" not in p.name)
            same &= bool(np.array_equal(read_image(written)[0], api_labels[path]))

    api_median, cli_median = statistics.median(api_s), statistics.median(cli_s)
    print(f"# {machine()}")
    print(f"model {args.model}: {len(model.predictor.folds)} network(s), mirroring "
          f"{'off' if args.no_mirroring else 'on'}; {len(args.input)} file(s)")
    print(f"API: load {load_s:.2f} s, first call {warm_s:.2f} s, then median {api_median:.3f} s per case "
          f"(max {max(api_s):.3f} s, {len(api_s)} calls)")
    print(f"CLI: `autoseg predict` per case from launch, median {cli_median:.2f} s ({len(cli_s)} case(s)); "
          f"API {cli_median / api_median:.1f}x faster per case; labels equal: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
