"""Driver run with nnunetv2's own Python by bench_plans.py; not part of autoseg.

Plans each named dataset with nnU-Net v2's default `ExperimentPlanner` (its plans land in
nnUNet_preprocessed/<dataset>/nnUNetPlans.json) and writes, as JSON to --json, the versions, the
import time and per dataset the plans file and the seconds planning took, or the error. The caller
sets nnUNet_raw and nnUNet_preprocessed (holding dataset.json and dataset_fingerprint.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import time
import traceback
from importlib.metadata import version
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", help="dataset folder names, e.g. Dataset901_Task01BrainTumour")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--budget-gb", type=float, default=8.0)
    parser.add_argument("--planner", default="ExperimentPlanner",
                        choices=["ExperimentPlanner", "nnUNetPlannerResEncM", "nnUNetPlannerResEncL",
                                 "nnUNetPlannerResEncXL"])
    parser.add_argument("--real-weights", action="store_true",
                        help="build the networks it sizes with real weights (slow) instead of on torch's meta device")
    args = parser.parse_args()

    t = time.perf_counter()
    import torch
    if not args.real_weights:
        # The planner builds a network for every patch it tries, only to count its feature maps from
        # the shapes; on the meta device no weights are allocated or filled, and the counts are the same.
        torch.set_default_device("meta")
    if args.planner == "ExperimentPlanner":
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
        planner_class = ExperimentPlanner
    else:
        from nnunetv2.experiment_planning.experiment_planners.residual_unets import residual_encoder_unet_planners
        planner_class = getattr(residual_encoder_unet_planners, args.planner)
    from nnunetv2.paths import nnUNet_preprocessed
    import_s = time.perf_counter() - t

    results = {}
    for name in args.datasets:
        log = io.StringIO()  # the planner prints each configuration; keep it out of the caller's output
        t = time.perf_counter()
        try:
            with contextlib.redirect_stdout(log):
                planner = planner_class(name, gpu_memory_target_in_gb=args.budget_gb)
                planner.plan_experiment()
            results[name] = {"seconds": time.perf_counter() - t,
                             "plans_file": str(Path(nnUNet_preprocessed) / name / f"{planner.plans_identifier}.json")}
        except Exception:
            results[name] = {"error": traceback.format_exc(), "log_tail": log.getvalue()[-2000:]}
    versions = {p: version(p) for p in ("nnunetv2", "torch", "dynamic_network_architectures")}
    versions["python"] = platform.python_version()
    args.json.write_text(json.dumps({"versions": versions, "import_s": import_s, "real_weights": args.real_weights,
                                     "datasets": results}, indent=1))


if __name__ == "__main__":
    main()
