"""`autoseg plan` as one library function: verify, fingerprint, plan and preprocess a dataset into a workspace.

The CLI and the benchmarks call `plan_workspace`; each step reads what the previous one wrote
(docs/workspace.md), so a step can also run alone (`steps`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from autoseg import workspace
from autoseg.atomic import write_json
from autoseg.dataset.layout import INSTANCES_DIR, Dataset, load_dataset
from autoseg.dataset.regions import order_problems
from autoseg.dataset.verify import VerifyReport, verify_dataset
from autoseg.errors import AutosegError
from autoseg.fingerprint import compute_fingerprint, load_fingerprint, save_fingerprint, verify_and_fingerprint
from autoseg.planning.planner import plan_experiment
from autoseg.planning.plans import PlanError, Plans
from autoseg.planning.transfer import source_plans_path, transfer_plans

log = logging.getLogger(__name__)

PLAN_STEPS = ("verify", "fingerprint", "plan", "preprocess")


class PlanWorkspaceError(AutosegError):
    """A dataset or workspace the plan steps cannot go on with; the message says what to fix."""

    def __init__(self, message: str, verification: VerifyReport | None = None):
        super().__init__(message)
        self.verification = verification  # the dataset's problems, when verification stopped the run


@dataclass
class PlanOutcome:
    """What `plan_workspace` did: the plans (when the plan or preprocess step ran), the verification
    report (when verify ran) and seconds per step."""

    dataset: Dataset
    plans: Plans | None = None
    verification: VerifyReport | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def _refuse_replanning_trained_models(workdir: Path, preset: str) -> None:
    """Plans of another preset would orphan the models trained under the current ones: each preset has its
    own workspace (the default and ResEnc networks never share a models/ folder or a plans.json)."""
    path = workspace.plans_json(workdir)
    if not path.is_file():
        return
    try:
        current = Plans.load(path).preset
    except PlanError:
        return  # unreadable plans are replaced
    trained = sorted({p.parent.parent.name for p in (workdir / "models").glob("*/fold_*/checkpoint_*.pt")})
    if current != preset and trained:
        raise PlanWorkspaceError(f"{workdir} holds models trained under the {current} preset ({', '.join(trained)}); "
                                 f"plan the {preset} preset into a workspace of its own (-o ANOTHER_FOLDER)")


INSTANCE_CHOICES = ("auto", "on", "off")


def _instance_choice(plans: Plans, dataset: Dataset, choice: str) -> Plans:
    """Plans with object boundaries as an extra label where the dataset's instance maps ask for it."""
    if choice == "off":
        if plans.instances is None:
            return plans
        semantic = {k: v for k, v in plans.labels.items() if k != plans.boundary_label}
        return replace(plans, instances=None, labels=semantic)
    if not dataset.has_instances:
        if choice == "on":
            with_maps = sum(c.instance_file is not None for c in dataset.cases)
            raise PlanWorkspaceError(f"--instances on: {dataset.root / INSTANCES_DIR} holds an instance map for "
                                     f"{with_maps} of {len(dataset.cases)} cases; every case needs one "
                                     f"(<case>{dataset.file_ending}, one id per object)")
        return plans
    try:
        return plans.with_instance_boundaries(
            f"the dataset has instance maps ({INSTANCES_DIR}/): each object's rim is learnt as label "
            f"{max(plans.labels) + 1}, so touching objects come out apart")
    except PlanError as exc:
        raise PlanWorkspaceError(str(exc)) from None


def plan_workspace(dataset_dir: Path, workdir: Path, steps: Sequence[str] = PLAN_STEPS,
                   configurations: Sequence[str] | None = None, memory_gb: float | None = None,
                   workers: int = 1, progress: bool = True, preset: str = "default",
                   plans_from: Path | None = None, instances: str = "auto") -> PlanOutcome:
    """Run `steps` in order into `workdir` (created if missing). `configurations=None`: plan every
    configuration that applies and preprocess all planned ones. Raises PlanWorkspaceError when the
    dataset has errors (listed in the outcome's verification and in `verify_report.json`). `preset`
    (autoseg/planning/presets.py) picks the network family; `memory_gb` defaults to its target.
    `plans_from` (a workspace or its plans.json) replaces planning by those plans carried over to this
    dataset (`planning/transfer.py`), for fine-tuning that workspace's models. `instances` ("auto": when
    the dataset has instance maps in instancesTr/, "on", "off") plans instance segmentation
    (docs/instances.md)."""
    if instances not in INSTANCE_CHOICES:
        raise PlanWorkspaceError(f"instances must be one of {', '.join(INSTANCE_CHOICES)}, got {instances!r}")
    unknown = [s for s in steps if s not in PLAN_STEPS]
    if unknown:
        raise PlanWorkspaceError(f"unknown step(s) {', '.join(unknown)}; choose from {', '.join(PLAN_STEPS)}")
    workdir = Path(workdir)
    dataset = load_dataset(dataset_dir)
    if workdir.resolve() == dataset.root:
        raise PlanWorkspaceError(f"{workdir}: the workspace must not be the dataset folder; choose a folder of its own")
    for problem in order_problems(dataset.regions):
        log.warning("%s: regions_class_order: %s, so that region is not found again in predicted label maps "
                    "(docs/datasets.md, region-based labels)", dataset.root / "dataset.json", problem)
    workdir.mkdir(parents=True, exist_ok=True)
    write_json(workspace.dataset_json(workdir), {"format_version": 1, **dataset.to_json()})
    outcome = PlanOutcome(dataset)
    fingerprint = None  # made by the verify step when both steps run (one pass over the files)
    if "verify" in steps:
        started = time.perf_counter()
        if "fingerprint" in steps:  # one pass: each file read once for both
            report, fingerprint = verify_and_fingerprint(dataset, workers=workers)
        else:
            report = verify_dataset(dataset, workers=workers)
        write_json(workspace.verify_report(workdir), report.to_json())
        outcome.verification = report
        outcome.seconds["verify and fingerprint" if fingerprint else "verify"] = time.perf_counter() - started
        if not report.ok:
            raise PlanWorkspaceError(f"the dataset has {len(report.errors)} error(s) (listed in "
                                     f"{workspace.verify_report(workdir)}); fix them and run again", report)
        if fingerprint is not None:
            save_fingerprint(fingerprint, workspace.fingerprint_json(workdir))
    if "fingerprint" in steps and fingerprint is None:
        started = time.perf_counter()
        save_fingerprint(compute_fingerprint(dataset, workers=workers), workspace.fingerprint_json(workdir))
        outcome.seconds["fingerprint"] = time.perf_counter() - started
    if "plan" in steps:
        fingerprint_path = workspace.fingerprint_json(workdir)
        if not fingerprint_path.is_file():
            raise PlanWorkspaceError(f"{fingerprint_path} not found; run the fingerprint step first")
        if plans_from is not None:
            source_path = source_plans_path(plans_from)
            source = Plans.load(source_path)
            _refuse_replanning_trained_models(workdir, source.preset)
            plans = transfer_plans(source, load_fingerprint(fingerprint_path), str(source_path))
            if configurations:
                plans = plans.with_configurations([c for c in configurations if c in plans.configurations])
        else:
            _refuse_replanning_trained_models(workdir, preset)
            plans = plan_experiment(load_fingerprint(fingerprint_path), budget_gb=memory_gb,
                                    configurations=list(configurations) if configurations else None, preset=preset)
        plans = _instance_choice(plans, dataset, instances)
        for name in configurations or ():
            if name not in plans.configurations:
                log.warning("not planned: %s (%s)", name, plans.not_planned.get(name, "not requested"))
        if not plans.configurations:
            raise PlanWorkspaceError("no configuration was planned: " + "; ".join(
                f"{c}: "
                f"{plans.not_planned.get(c, '')}" for c in configurations or ()) + "; choose another with --configs")
        plans.save(workspace.plans_json(workdir))
        log.info("wrote %s (configurations: %s; default %s)", workspace.plans_json(workdir),
                 ", ".join(plans.configurations), plans.default_configuration)
        outcome.plans = plans
    if "preprocess" in steps:
        plans = Plans.load(workspace.plans_json(workdir))
        chosen = [c for c in (configurations or plans.configurations) if c in plans.configurations]
        chosen += plans.previous_stages(chosen)
        started = time.perf_counter()
        from autoseg.preprocessing.preprocess import preprocess_dataset  # scipy, blosc2: when this step runs

        preprocess_dataset(dataset, plans, workdir, chosen, workers=workers, progress=progress)
        outcome.plans, outcome.seconds["preprocess"] = plans, time.perf_counter() - started
    return outcome
