"""Time `autoseg plan` against nnU-Net v2's `nnUNetv2_plan_and_preprocess` on the same dataset.

Both tools verify, fingerprint, plan and preprocess the same cases with the same number of worker
processes, each into a fresh temporary folder. Wall time is measured from process start to exit;
peak memory is the largest sum over the whole process tree (the command and every descendant),
sampled with psutil every 0.1 s, both as resident set size (RSS; pages shared between processes are
counted once per process) and as proportional set size (PSS; shared pages split between the
processes that share them, so the sum is the memory the run really occupied). Only the standard
library and psutil are used (`pip install -e '.[bench]'`).

nnU-Net v2 lives in its own virtual environment (see benchmarks/README.md); pass its bin folder
with --nnunet-venv or put it on PATH. Converting the dataset into nnU-Net's raw layout is setup and
is not timed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

try:
    import psutil
except ImportError:  # checked in main(), so --help works without it
    psutil = None

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATASET = REPO_ROOT.parent / "shared" / "datasets" / "Task04_Hippocampus"
SAMPLE_INTERVAL_S = 0.1
PSS_EVERY = 10  # PSS is read every 10th sample (1 s): reading it is far dearer than RSS.
NNUNET_PLAN = "nnUNetv2_plan_and_preprocess"
NNUNET_CONVERT_MSD = "nnUNetv2_convert_MSD_dataset"
# Lines nnU-Net prints as each stage starts, in order, to split its wall time (it prints no timestamps).
NNUNET_STAGE_MARKERS = (("verify", "Fingerprint extraction..."),
                        ("fingerprint", "verify_dataset_integrity Done"),
                        ("plan", "Experiment planning..."),
                        ("preprocess", "Preprocessing..."))


class BenchError(Exception):
    """A problem with the benchmark's inputs or a tool's run; printed without a traceback."""


@dataclass
class RunResult:
    tool: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    peak_pss_mb: float
    largest_process_rss_mb: float
    returncode: int
    load_before: float
    stage_starts_s: dict[str, float] = field(default_factory=dict)
    stage_s: dict[str, float] = field(default_factory=dict)
    first_output_s: float | None = None
    log_tail: str = ""


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _tree_rss(procs: list[psutil.Process]) -> int:
    """Sum of RSS in bytes (from /proc/PID/statm: cheap); vanished processes are skipped."""
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def _tree_pss(procs: list[psutil.Process]) -> int:
    """Sum of PSS in bytes from /proc/PID/smaps_rollup, which costs tens of ms per GB-sized process."""
    total = 0
    for proc in procs:
        try:
            with open(f"/proc/{proc.pid}/smaps_rollup") as rollup:
                total += next(int(line.split()[1]) * 1024 for line in rollup if line.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


def run_measured(tool: str, cmd: list[str], env: dict[str, str], log_path: Path,
                 markers: tuple[tuple[str, str], ...] = (), pss_every: int = PSS_EVERY) -> RunResult:
    """Run `cmd`, sampling the tree's memory and timestamping each output line.

    RSS is summed every 0.1 s, PSS every `pss_every`-th sample (0: never). CPU time and the largest
    single process's RSS come from wait4, as /usr/bin/time -v reports them.
    """
    env = {**env, "PYTHONUNBUFFERED": "1"}
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    stage_starts: dict[str, float] = {}
    first_output: list[float] = []

    def read_output() -> None:
        # Chunks, not lines: a progress bar (ended by \r, not \n) is output a user sees too.
        pending = b""
        with open(log_path, "wb") as log:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                now = time.perf_counter() - start
                if not first_output:
                    first_output.append(now)
                *complete, pending = re.split(rb"[\r\n]", pending + chunk)
                for raw in complete:
                    log.write(f"[{now:8.2f}] ".encode() + raw + b"\n")
                    line = raw.decode(errors="replace")
                    for stage, text in markers:
                        if stage not in stage_starts and text in line:
                            stage_starts[stage] = now
            if pending:
                log.write(f"[{time.perf_counter() - start:8.2f}] ".encode() + pending + b"\n")

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    ps_root = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    sample = 0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        procs = _tree(ps_root)
        peak_rss = max(peak_rss, _tree_rss(procs))
        if pss_every and sample % pss_every == 0:
            peak_pss = max(peak_pss, _tree_pss(procs))
        sample += 1
        time.sleep(SAMPLE_INTERVAL_S)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
    return RunResult(tool, wall, usage.ru_utime + usage.ru_stime, peak_rss / 2**20,
                     peak_pss / 2**20 if pss_every else float("nan"), usage.ru_maxrss / 1024,
                     proc.returncode, load_before, stage_starts_s=stage_starts,
                     first_output_s=first_output[0] if first_output else None, log_tail=tail)


def _marker_stage_times(result: RunResult, markers: tuple[tuple[str, str], ...]) -> dict[str, float]:
    """Each stage's seconds, from its start line to the next stage's start line (the last to the exit)."""
    starts = [(stage, result.stage_starts_s.get(stage)) for stage, _ in markers]
    times = {}
    for i, (stage, start) in enumerate(starts):
        if start is None:
            continue
        ends = [t for _, t in starts[i + 1:] if t is not None]
        times[stage] = (ends[0] if ends else result.wall_s) - start
    return times


def _autoseg_stage_times(log_path: Path) -> dict[str, float]:
    """Read autoseg's closing 'done: verify 1.2 s, ...' line."""
    for line in reversed(log_path.read_text(errors="replace").splitlines()):
        if "done:" in line:
            return {name.strip(): float(sec)
                    for name, sec in re.findall(r"([a-z][a-z ]*?) ([\d.]+) s", line.split("done:", 1)[1])}
    return {}


def _dataset_meta(dataset: Path) -> dict:
    meta_path = dataset / "dataset.json"
    if not meta_path.is_file():
        raise BenchError(f"{meta_path}: missing; pass a Decathlon or nnU-Net v2 dataset folder")
    return json.loads(meta_path.read_text())


def stage_nnunet_raw(dataset: Path, meta: dict, raw_dir: Path, dataset_id: int | None,
                     nnunet_bin: Path, env: dict[str, str]) -> tuple[int, str, float]:
    """Put the dataset into nnU-Net's raw folder; return its id, folder name and setup seconds.

    A Decathlon dataset is converted with nnUNetv2_convert_MSD_dataset from a folder of links to the
    cases its dataset.json lists (so both tools see the same cases); an nnU-Net v2 dataset is linked.
    """
    start = time.perf_counter()
    if "channel_names" in meta:
        # nnU-Net finds a dataset by a DatasetNNN_Name folder; the link gets one when the folder is named otherwise
        match = re.match(r"Dataset(\d{3})_(.+)$", dataset.name)
        dataset_id = dataset_id or (int(match.group(1)) if match else 999)
        short_name = match.group(2) if match else (re.sub(r"[^A-Za-z0-9]", "", dataset.name) or "Dataset")
        name = f"Dataset{dataset_id:03d}_{short_name}"
        (raw_dir / name).symlink_to(dataset.resolve(), target_is_directory=True)
        return dataset_id, name, time.perf_counter() - start
    if "modality" not in meta:
        raise BenchError(f"{dataset / 'dataset.json'}: neither Decathlon ('modality') nor nnU-Net v2 ('channel_names')")
    match = re.match(r"Task(\d+)_(.+)$", dataset.name)
    task_id = int(match.group(1)) if match else 999
    short_name = re.sub(r"[^A-Za-z0-9]", "", match.group(2) if match else dataset.name) or "Dataset"
    dataset_id = dataset_id or task_id
    # The converter derives the name from 'TaskNN_Name' (one underscore) and needs imagesTs to exist.
    msd = raw_dir.parent / "msd_source" / f"Task{task_id:02d}_{short_name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (msd / sub).mkdir(parents=True)
    for case in meta["training"]:
        for key in ("image", "label"):
            rel = Path(case[key])
            (msd / rel).symlink_to((dataset / rel).resolve())
    shutil.copy(dataset / "dataset.json", msd / "dataset.json")
    cmd = [str(nnunet_bin / NNUNET_CONVERT_MSD), "-i", str(msd), "-overwrite_id", str(dataset_id), "-np", "2"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    name = f"Dataset{dataset_id:03d}_{short_name}"
    if not (raw_dir / name).is_dir():
        raise BenchError(f"{NNUNET_CONVERT_MSD} did not create {raw_dir / name}")
    return dataset_id, name, time.perf_counter() - start


def autoseg_outcome(workdir: Path) -> str:
    """Say which configurations autoseg preprocessed and how many cases each."""
    plans = json.loads((workdir / "plans.json").read_text())
    parts = []
    for name, conf in plans["configurations"].items():
        folder = workdir / "preprocessed" / conf["data_identifier"]
        n = len(list(folder.glob("*.json")))  # one properties file per complete case
        parts.append(f"{name} {n} cases")
    return "; ".join(parts)


def nnunet_outcome(preprocessed: Path) -> str:
    """Say which configurations nnU-Net planned and which folders it filled with how many cases."""
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    parts = []
    for name, conf in plans["configurations"].items():
        ident = conf.get("data_identifier")
        folder = preprocessed / ident if ident else None
        if folder is not None and folder.is_dir():
            parts.append(f"{name} {len(list(folder.glob('*.pkl')))} cases")
        else:
            parts.append(f"{name} planned, not preprocessed")
    return "; ".join(parts)


def nnunet_env(nnunet_bin: Path, cache: Path, results: Path | None = None) -> dict[str, str]:
    """Environment for nnU-Net's processes: its bin first on PATH and its three path variables in `cache`."""
    env = {**os.environ, "PATH": f"{nnunet_bin}{os.pathsep}{os.environ.get('PATH', '')}",
           "nnUNet_raw": str(cache / "nnUNet_raw"), "nnUNet_preprocessed": str(cache / "nnUNet_preprocessed"),
           "nnUNet_results": str(results or cache / "nnUNet_results"), "PYTHONUNBUFFERED": "1"}
    env.pop("VIRTUAL_ENV", None)
    return env


def require_nnunet_bin(arg: str | None) -> Path:
    """find_nnunet_bin for a script that compares with nnU-Net and cannot run without it."""
    found = find_nnunet_bin(arg)
    if found is None:
        raise BenchError("nnunetv2 not found; install it in its own venv (benchmarks/README.md) and pass --nnunet-venv")
    return found


def find_nnunet_bin(arg: str | None) -> Path | None:
    """The folder holding nnUNetv2_plan_and_preprocess: --nnunet-venv (venv or its bin), else PATH."""
    if arg:
        for candidate in (Path(arg), Path(arg) / "bin"):
            if (candidate / NNUNET_PLAN).is_file():
                return candidate.resolve()
        raise BenchError(f"{arg}: no {NNUNET_PLAN} there; pass the nnunetv2 venv or its bin folder")
    found = shutil.which(NNUNET_PLAN)
    return Path(found).parent if found else None


def find_autoseg(arg: str | None) -> list[str]:
    if arg:
        return [arg]
    beside = Path(sys.executable).parent / "autoseg"
    if beside.is_file():
        return [str(beside)]
    if shutil.which("autoseg"):
        return [shutil.which("autoseg")]
    return [sys.executable, "-m", "autoseg.cli"]


def _python_of(bin_dir: Path) -> str:
    return str(bin_dir / "python") if (bin_dir / "python").exists() else sys.executable


def package_version(python: str, package: str) -> str:
    done = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{package}'))"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "not installed"


def time_import(python: str, module: str, env: dict[str, str]) -> float:
    """Seconds for a fresh interpreter to import `module` (the start-up cost before any work)."""
    start = time.perf_counter()
    subprocess.run([python, "-c", f"import {module}"], env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def machine_description() -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem_gb = psutil.virtual_memory().total / 2**30
    return (f"{_machine.machine()}, {usable} usable cores, {mem_gb:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time `autoseg plan` (verify, fingerprint, plan, preprocess) and, when nnunetv2 is "
                    "available, nnUNetv2_plan_and_preprocess with --verify_dataset_integrity on the same "
                    "cases; print wall time, peak memory of the process tree and the ratio nnunet/autoseg.",
        epilog="Example: python benchmarks/bench_plan.py --workers 2 --repeat 2 "
               "--nnunet-venv /work/bench/nnunet_venv/bin")
    parser.add_argument("dataset", nargs="?", type=Path, default=DEFAULT_DATASET,
                        help="dataset folder, Decathlon or nnU-Net v2 layout (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes for both tools: autoseg --workers N, nnU-Net -np N -npfp N "
                             "(default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per tool, alternating autoseg and nnU-Net; the median is reported (default: "
                             "%(default)s)")
    parser.add_argument("--nnunet-venv", metavar="PATH",
                        help="nnunetv2 virtual environment or its bin folder (default: look on PATH)")
    parser.add_argument("--no-nnunet", action="store_true", help="time autoseg only")
    parser.add_argument("--nnunet-id", type=int, help="nnU-Net dataset id to use (default: from the folder name)")
    parser.add_argument("--autoseg", metavar="EXE", help="autoseg executable (default: the one beside this Python)")
    parser.add_argument("--tmp-dir", type=Path, help="parent of the temporary workspaces (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspaces and logs")
    parser.add_argument("--pss-every", type=int, default=PSS_EVERY, metavar="N",
                        help="read PSS every N-th 0.1 s sample; 0 skips it (default: %(default)s; reading PSS costs "
                             "tens of ms of CPU per GB-sized process)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run's figures to FILE")
    return parser


def _stage_summary(runs: list[RunResult], source: str) -> str:
    first = statistics.median(r.first_output_s if r.first_output_s is not None else float("nan") for r in runs)
    names = list(dict.fromkeys(k for r in runs for k in r.stage_s))
    stages = ", ".join(f"{k} {statistics.median(r.stage_s.get(k, float('nan')) for r in runs):.1f}" for k in names)
    return f"median s: first output after {first:.1f}; stages (from {source}): {stages or 'not found'}"


def _run_line(i: int, r: RunResult) -> str:
    return (f"run {i + 1}: {r.tool:8s} wall {r.wall_s:6.1f} s  CPU {r.cpu_s:6.1f} s  RSS sum {r.peak_rss_mb:5.0f} MB  "
            f"PSS sum {r.peak_pss_mb:5.0f} MB  largest {r.largest_process_rss_mb:5.0f} MB  "
            f"(load average before: {r.load_before:.1f})")


def _median(results: list[RunResult], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in results)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if psutil is None:
        raise BenchError("psutil is needed to sample memory; install it with `pip install -e '.[bench]'`")
    dataset = args.dataset.resolve()
    meta = _dataset_meta(dataset)
    if args.repeat < 1 or args.workers < 1:
        raise BenchError("--repeat and --workers must be at least 1")
    nnunet_bin = None if args.no_nnunet else find_nnunet_bin(args.nnunet_venv)
    autoseg_cmd = find_autoseg(args.autoseg)
    n_cases = meta.get("numTraining", len(meta.get("training", [])))

    tmp = Path(tempfile.mkdtemp(prefix="bench_plan_", dir=args.tmp_dir))
    base_env = dict(os.environ)
    print(f"machine:  {machine_description()}")
    print(f"date:     {datetime.date.today().isoformat()}")
    print(f"dataset:  {dataset} ({n_cases} training cases), workers {args.workers}, repeat {args.repeat}")
    print(f"autoseg:  {package_version(sys.executable, 'autoseg')} ({' '.join(autoseg_cmd)}), "
          f"torch {package_version(sys.executable, 'torch')}")

    nnunet_env = None
    if nnunet_bin is None:
        print("nnunetv2: not found (pass --nnunet-venv); timing autoseg only")
    else:
        nnunet_python = _python_of(nnunet_bin)
        print(f"nnunetv2: {package_version(nnunet_python, 'nnunetv2')} ({nnunet_bin}), "
              f"torch {package_version(nnunet_python, 'torch')}")
        raw = tmp / "nnUNet_raw"
        raw.mkdir()
        nnunet_env = {**base_env, "PATH": f"{nnunet_bin}{os.pathsep}{base_env.get('PATH', '')}",
                      "nnUNet_raw": str(raw), "nnUNet_results": str(tmp / "nnUNet_results")}
        nnunet_env.pop("VIRTUAL_ENV", None)
        dataset_id, nnunet_name, setup_s = stage_nnunet_raw(dataset, meta, raw, args.nnunet_id, nnunet_bin,
                                                            {**nnunet_env, "nnUNet_preprocessed": str(tmp / "unused")})
        print(f"setup:    nnU-Net raw dataset {nnunet_name} prepared in {setup_s:.1f} s (not timed)")

    logs = tmp / "logs"
    logs.mkdir()
    autoseg_runs: list[RunResult] = []
    nnunet_runs: list[RunResult] = []
    outcomes: dict[str, str] = {}
    for i in range(args.repeat):
        workdir = tmp / f"autoseg_ws_{i}"
        cmd = [*autoseg_cmd, "plan", str(dataset), "-o", str(workdir), "--workers", str(args.workers)]
        result = run_measured("autoseg", cmd, base_env, logs / f"autoseg_{i}.log", pss_every=args.pss_every)
        if result.returncode != 0:
            raise BenchError(f"autoseg failed (exit {result.returncode}):\n{result.log_tail}")
        result.stage_s = _autoseg_stage_times(logs / f"autoseg_{i}.log")
        autoseg_runs.append(result)
        outcomes["autoseg"] = autoseg_outcome(workdir)
        print(_run_line(i, result), flush=True)
        if not args.keep:
            shutil.rmtree(workdir)
        if nnunet_env is None:
            continue
        preprocessed = tmp / f"nnUNet_preprocessed_{i}"
        env = {**nnunet_env, "nnUNet_preprocessed": str(preprocessed)}
        cmd = [str(nnunet_bin / NNUNET_PLAN), "-d", str(dataset_id), "-np", str(args.workers),
               "-npfp", str(args.workers), "--verify_dataset_integrity"]
        result = run_measured("nnunetv2", cmd, env, logs / f"nnunet_{i}.log", NNUNET_STAGE_MARKERS,
                              pss_every=args.pss_every)
        if result.returncode != 0:
            raise BenchError(f"nnUNetv2_plan_and_preprocess failed (exit {result.returncode}):\n{result.log_tail}")
        result.stage_s = _marker_stage_times(result, NNUNET_STAGE_MARKERS)
        nnunet_runs.append(result)
        outcomes["nnunetv2"] = nnunet_outcome(preprocessed / nnunet_name)
        print(_run_line(i, result), flush=True)
        if not args.keep:
            shutil.rmtree(preprocessed)

    print()
    print(f"autoseg did:  {' '.join(autoseg_cmd)} plan DATASET -o WORKDIR --workers {args.workers}")
    print("              verify (always), fingerprint, plan, preprocess -> " + outcomes["autoseg"])
    print("              " + _stage_summary(autoseg_runs, "its closing log line"))
    if nnunet_runs:
        print(f"nnunetv2 did: {NNUNET_PLAN} -d {dataset_id} -np {args.workers} -npfp {args.workers} "
              "--verify_dataset_integrity")
        print("              verify (only with that flag), fingerprint, plan (ExperimentPlanner, 8 GB target), "
              "preprocess -> " + outcomes["nnunetv2"])
        print("              " + _stage_summary(nnunet_runs, "the time its stage messages appeared"))
        print("              fingerprinting starts after {:.1f} s (median; verification runs first)".format(
            statistics.median(r.stage_starts_s.get("fingerprint", float("nan")) for r in nnunet_runs)))
        import_s = time_import(_python_of(nnunet_bin),
                               "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", nnunet_env)
        print(f"              a fresh interpreter imports its entry point in {import_s:.1f} s")

    print()
    columns = (("wall_s", "wall s", ".1f"), ("cpu_s", "CPU s", ".1f"), ("peak_rss_mb", "RSS sum MB", ".0f"),
               ("peak_pss_mb", "PSS sum MB", ".0f"), ("largest_process_rss_mb", "largest MB", ".0f"))
    print(f"median of {args.repeat} run(s)")
    print(f"{'':10s}" + "".join(f"{title:>12s}" for _, title, _ in columns))
    rows = [("autoseg", autoseg_runs)] + ([("nnunetv2", nnunet_runs)] if nnunet_runs else [])
    for name, runs in rows:
        print(f"{name:10s}" + "".join(f"{_median(runs, attr):12{fmt}}" for attr, _, fmt in columns))
    if nnunet_runs:
        print(f"{'ratio':10s}" + "".join(f"{_median(nnunet_runs, a) / _median(autoseg_runs, a):11.2f}x"
                                          for a, _, _ in columns) + "   (nnunetv2 / autoseg)")
    print("wall: launch to exit. CPU: user+system of the process and all its descendants (wait4).")
    print(f"RSS sum: largest sum of RSS over the process tree, sampled every {SAMPLE_INTERVAL_S} s (pages shared "
          "between processes count once per process).")
    print(f"PSS sum: the same with PSS (shared pages split), sampled every {SAMPLE_INTERVAL_S * args.pss_every:g} s. "
          "largest: max RSS of the biggest single process (wait4, as /usr/bin/time -v).")
    own = resource.getrusage(resource.RUSAGE_SELF)
    print(f"this script's own CPU time (sampling, reading output): {own.ru_utime + own.ru_stime:.1f} s")

    if args.json:
        record = {"date": datetime.date.today().isoformat(), "machine": machine_description(),
                  "dataset": str(dataset), "workers": args.workers, "outcomes": outcomes,
                  "runs": [r.__dict__ for r in autoseg_runs + nnunet_runs]}
        args.json.write_text(json.dumps(record, indent=2))
    if args.keep:
        print(f"workspaces and logs kept in {tmp}")
    else:
        shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_plan: error: {exc}", file=sys.stderr)
        sys.exit(2)
