"""Whether bfloat16 convolutions give the same, finite gradients on every call on this CPU and torch,
for plain torch and for autoseg's convolutions (which leave bf16 where `autoseg.network.unet` says).

    python benchmarks/bench_conv_bf16.py [--cases 600] [--repeats 6] [--threads 1] [--seed 0]

Draws `--cases` random 2D and 3D convolutions (kernel 1 or 3 per axis, the sizes plans use; 'same'
padding, stride 1 or 2, map 1-6 voxels per axis, 1-32 channels, contiguous or channels_last; stride 1
where one channel comes in, as in a U-Net, whose only such convolution reads the image) and runs each
`--repeats` times, forward and backward under CPU bfloat16 autocast, with other allocations in
between. A case is wrong when its output or gradients change between calls, hold NaN or inf, or the
process dies or spins (heap corruption: cases run in a child process, which is killed after 30 s
without progress, and the next child carries on).
Prints how many cases were wrong for torch's nn.ConvNd and for autoseg's (each in its own processes),
and how many of the wrong cases have a kernel longer than the map along some axis (the rule of
autoseg's guard). When no torch case is wrong, this torch and CPU do not need the guard.
One thread is the default, as in each process of `autoseg train --gpus N --device cpu`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from autoseg.network.layers import Conv2d, Conv3d, kernel_exceeds_map

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402


def draw_cases(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for _ in range(n):
        ndim = rng.choice([2, 3, 3])
        channels = [rng.choice([1, 4, 32]), rng.choice([1, 4, 32])]
        stride = [rng.choice([1, 1, 2]) if channels[0] > 1 else 1 for _ in range(ndim)]
        cases.append({"ndim": ndim, "kernel": [rng.choice([1, 3, 3]) for _ in range(ndim)],
                      "size": [rng.randint(1, 6) for _ in range(ndim)], "stride": stride, "channels": channels,
                      "channels_last": rng.random() < 0.5, "batch": rng.choice([1, 2])})
    return cases


def repeats_exactly(conv: nn.Module, case: dict, repeats: int, seed: int) -> bool:
    """Forward and backward `repeats` times under CPU bf16 autocast; True when every call agrees and is finite."""
    generator = torch.Generator().manual_seed(seed)
    layout = (torch.channels_last if case["ndim"] == 2 else torch.channels_last_3d) if case["channels_last"] \
        else torch.contiguous_format
    conv = conv.to(memory_format=layout)
    x0 = torch.randn(case["batch"], case["channels"][0], *case["size"], generator=generator)
    x0 = x0.contiguous(memory_format=layout)
    first = None
    for _ in range(repeats):
        conv.zero_grad()
        x = x0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        values = torch.cat([y.detach().float().flatten(), x.grad.float().flatten(), conv.weight.grad.float().flatten()])
        _ = [torch.full((n,), float("nan")) for n in (37, 1000, 4099)]  # fill freed memory with NaN
        if not torch.isfinite(values).all() or (first is not None and not torch.equal(values, first)):
            return False
        first = values if first is None else first
    return True


IMPLEMENTATIONS = {"torch": (nn.Conv2d, nn.Conv3d), "autoseg": (Conv2d, Conv3d)}


def run_child(cases: list[dict], implementation: str, start: int, repeats: int, out: Path) -> None:
    """Append a JSON line as each case starts and one with its verdict, so a crash names its case."""
    kinds = IMPLEMENTATIONS[implementation]
    with open(out, "a") as f:
        for index in range(start, len(cases)):
            case = cases[index]
            print(json.dumps({"index": index}), file=f, flush=True)
            torch.manual_seed(index)
            conv = kinds[case["ndim"] - 2](*case["channels"], case["kernel"], stride=case["stride"],
                                           padding=[k // 2 for k in case["kernel"]], bias=False)
            print(json.dumps({"index": index, "right": repeats_exactly(conv, case, repeats, seed=index)}),
                  file=f, flush=True)


def _wait_while_progressing(child: subprocess.Popen, out: Path, patience_s: float = 30.0) -> bool:
    """Wait for `child`; kill it when `out` has not grown for `patience_s` (a case spinning). True if killed."""
    size, since = -1, time.monotonic()
    while child.poll() is None:
        now_size = out.stat().st_size if out.exists() else 0
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since > patience_s:
            child.kill()
            child.wait()
            return True
        time.sleep(0.2)
    return False


def run_all(cases: list[dict], implementation: str, repeats: int, threads: int, seed: int) -> dict[int, str]:
    """Each case's verdict for one implementation: "right", "wrong", "crashed" (the child process died)
    or "hung" (it spun without finishing the case for 30 s and was killed).

    Each implementation runs in its own child processes: memory that a wrong convolution corrupted
    could make a later case fail.
    """
    verdicts: dict[int, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "verdicts.jsonl"
        start = 0
        while start < len(cases):
            child = subprocess.Popen([sys.executable, __file__, "--child", implementation, str(start), "--cases",
                                      str(len(cases)), "--repeats", str(repeats), "--threads", str(threads),
                                      "--seed", str(seed), "--out", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            hung = _wait_while_progressing(child, out)
            last = start
            for line in out.read_text().splitlines() if out.exists() else []:
                row = json.loads(line)
                last = max(last, row["index"])
                if "right" in row:
                    verdicts[row["index"]] = "right" if row["right"] else "wrong"
            verdicts.setdefault(last, "hung" if hung else "crashed")
            start = last + 1
    return verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=600, help="random convolutions to try (default 600)")
    parser.add_argument("--repeats", type=int, default=6, help="calls per convolution (default 6)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = draw_cases(args.cases, args.seed)
    if args.child is not None:
        run_child(cases, args.child[0], int(args.child[1]), args.repeats, args.out)
        return 0
    print(machine())
    print(f"{len(cases)} random convolutions, {args.repeats} calls each under CPU bfloat16 autocast, "
          f"{args.threads} thread(s), seed {args.seed}")
    verdicts = {name: run_all(cases, name, args.repeats, args.threads, args.seed) for name in IMPLEMENTATIONS}
    for name, label in (("torch", "torch nn.ConvNd"), ("autoseg", "autoseg ConvNd")):
        wrong = [i for i, v in verdicts[name].items() if v != "right"]
        crashed = sum(v == "crashed" for v in verdicts[name].values())
        hung = sum(v == "hung" for v in verdicts[name].values())
        exceeding = sum(kernel_exceeds_map(cases[i]["size"], cases[i]["kernel"]) for i in wrong)
        print(f"{label}: {len(wrong)} of {len(cases)} wrong ({crashed} crashed the process, {hung} hung), "
              f"{exceeding} of them with a kernel longer than the map")
        for i in wrong[:3]:
            print(f"  e.g. {json.dumps(cases[i])}: {verdicts[name][i]}")
    drawn = sum(kernel_exceeds_map(c["size"], c["kernel"]) for c in cases)
    print(f"cases with a kernel longer than the map: {drawn}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
