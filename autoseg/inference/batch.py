"""Predict a folder of cases: reading and preprocessing ahead and writing behind the networks, in
bounded memory, with a summary of what was written, skipped and failed.

`predict_folder` is what `autoseg predict` runs (docs/prediction.md). It drives a `Predictor`
(predictor.py) over the cases `discover_inputs` finds, and writes each case's label map in its
input's format, optionally its probabilities, uncertainty map and DICOM-SEG, and the report files
(`volumes.csv`, `qc/<case>.png`, `report.html`; docs/reports.md). What the run did is recorded in
`prediction_summary.json` (one per part with --num-parts).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from autoseg import __version__, workspace
from autoseg.atomic import write_json
from autoseg.dataset.image_io import write_image
from autoseg.inference.inputs import InputCase, InputError, discover_inputs, read_input_case
from autoseg.inference.instance_maps import gather_object_tables, write_instances
from autoseg.inference.original_grid import save_probabilities, segmentation_suffix, write_segmentation
from autoseg.inference.predictor import CaseSegmentation, Predictor, PreparedCase
from autoseg.inference.settings import BatchOptions, ComputeSettings, ModelChoice, OutputOptions, WindowSettings
from autoseg.inference.volumes import VolumeTable, structure_rows
from autoseg.postprocessing import apply_postprocessing, load_postprocessing_rules

log = logging.getLogger(__name__)

SUMMARY_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PredictionSummary:
    """What one run did: `prediction_summary.json`."""

    written: list[str]  # case ids written in this run
    skipped: list[str]  # case ids whose output already existed (--continue)
    failed: list[tuple[str, str]]  # (case id or input file, what went wrong)
    settings: dict = field(default_factory=dict)
    # (case id, what looks wrong) for cases predicted all the same (input_checks.py)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format_version": SUMMARY_FORMAT_VERSION, "written": self.written, "skipped": self.skipped,
                "failed": [{"input": k, "error": m} for k, m in self.failed],
                "warnings": [{"case": k, "warning": m} for k, m in self.warnings], "settings": self.settings}


def predict_folder(workdir: Path, inputs: Path | Sequence[Path], output_dir: Path,
                   model: ModelChoice = ModelChoice(), window: WindowSettings = WindowSettings(),
                   compute: ComputeSettings = ComputeSettings(), outputs: OutputOptions = OutputOptions(),
                   batch: BatchOptions = BatchOptions()) -> PredictionSummary:
    """Segment every case found in `inputs` into `output_dir/<case_id><ending>` in the input's format (a PNG
    for a PNG); see docs/prediction.md and each settings record for what it controls.

    While the network runs on one case, `batch.workers` background threads read and preprocess the
    next ones and write finished ones (0: everything in this thread). One bad input is reported in
    the result and `prediction_summary.json`, the others still run. With `outputs.report_files` also
    `volumes.csv`, `qc/<case>.png` and `report.html`; with >= 2 members ensembled, labels whose
    uncertainty exceeds `outputs.uncertainty_threshold` are flagged there. `batch.skip_existing` skips
    a case whose outputs exist and, with report files, whose rows volumes.csv holds.
    """
    started = time.perf_counter()
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(workdir, model, window, compute)
    rules_path = workspace.postprocessing_json(workdir)
    rules = load_postprocessing_rules(rules_path) if outputs.postprocessing and rules_path.is_file() else None
    configurations = predictor.configurations
    if rules is not None and sorted(rules.get("configuration") or configurations) != sorted(configurations):
        log.warning("%s was decided for %s, not for %s: not applied", rules_path,
                    "+".join(rules["configuration"]), "+".join(configurations))
        rules = None

    labels = predictor.plans.output_labels  # never the ignore label nor object rims
    model_name = _model_name(predictor, outputs.model_name)
    volumes = VolumeTable(output_dir / "volumes.csv", model_name) if outputs.report_files else None
    cases, problems = discover_inputs(inputs, predictor.num_channels, predictor.plans.channel_names)
    failed: list[tuple[str, str]] = list(problems)
    input_files = {f.resolve() for c in cases for f in c.files}
    # A case whose label map was written but not its rows (interrupted in between) is predicted again.
    recorded = volumes.cases(labels=[k for k in labels if k > 0]) if batch.skip_existing and volumes else None
    todo, skipped, unrecorded = [], [], 0
    for case in cases[batch.part_id::batch.num_parts]:
        out = _output_path(output_dir, case, outputs.output_format)
        if out.resolve() in input_files:
            failed.append((case.case_id, f"{out}: the output would overwrite an input file; choose another output "
                                         f"folder"))
        elif (batch.skip_existing and out.is_file()
              and (not outputs.save_probabilities or out.with_name(f"{case.case_id}.npz").is_file())):
            if recorded is None or case.case_id in recorded:
                skipped.append(case.case_id)
            else:
                unrecorded += 1
                todo.append(case)
        else:
            todo.append(case)
    if skipped:
        log.info("%d case(s) already predicted in %s, skipped", len(skipped), output_dir)
    if unrecorded:
        log.info("%d case(s) predicted before but missing from %s: predicted again", unrecorded, volumes.path)

    writing = _Writing(output_dir, rules, outputs, labels, volumes)
    # Torch keeps every core: the background threads mostly wait on files (benchmarks/README.md).
    warnings: list[tuple[str, str]] = []
    written = _run_pipeline(predictor, todo, writing, batch.workers, batch.progress, failed, warnings)

    settings = {**predictor.settings(), "model": model_name, "inputs": [str(p) for p in inputs],
                "output_dir": str(output_dir),
                "postprocessing": str(rules_path) if rules is not None else None,
                "save_probabilities": outputs.save_probabilities, "save_uncertainty": outputs.save_uncertainty,
                "uncertainty_threshold": outputs.uncertainty_threshold, "report_files": outputs.report_files,
                "output_format": outputs.output_format, "continue": batch.skip_existing,
                "num_parts": batch.num_parts, "part_id": batch.part_id, "workers": batch.workers,
                "autoseg_version": __version__, "seconds": round(time.perf_counter() - started, 2)}
    result = PredictionSummary(sorted(written), skipped, failed, settings, warnings)
    summary_path = workspace.prediction_summary_json(output_dir, batch.num_parts, batch.part_id)
    write_json(summary_path, result.to_json())
    if predictor.plans.instances is not None:
        gather_object_tables(output_dir)
    if volumes is not None:
        from autoseg.inference.qc import write_html_report

        write_html_report(output_dir, volumes.path, output_dir / "qc", output_dir / "report.html")
    log.info("predicted %d case(s), skipped %d, failed %d; summary in %s", len(written), len(skipped), len(failed),
             summary_path)
    for key, message in failed:
        log.warning("failed: %s: %s", key, message)
    for key, message in warnings:
        log.warning("warning: %s: %s", key, message)
    return result


def _output_path(output_dir: Path, case: InputCase, output_format: str = "default") -> Path:
    """`<case_id>` in the input's format (a JPEG input gets a PNG: see `segmentation_suffix`), or `.dcm`
    (DICOM-SEG) for a DICOM series with output_format "dicom-seg"."""
    if output_format == "dicom-seg" and _is_dicom_series(case):
        return output_dir / f"{case.case_id}.dcm"
    return output_dir / f"{case.case_id}{segmentation_suffix(case.ending)}"


def _is_dicom_series(case: InputCase) -> bool:
    return getattr(case, "series_uid", None) is not None or any(f.suffix.lower() == ".dcm" for f in case.files)


def _model_name(predictor: Predictor, name: str | None = None) -> str:
    """What volumes.csv records as the model: workspace (or `name`), configurations and folds."""
    folds = ",".join(dict.fromkeys(f.fold for f in predictor.folds))
    return f"{name or predictor.workdir.name}:{'+'.join(predictor.configurations)}:folds {folds}"


@dataclass(frozen=True)
class _Writing:
    """Where and what to write per case besides the label map."""

    folder: Path
    rules: dict | None
    options: OutputOptions
    labels: dict[int, str]
    volumes: VolumeTable | None  # None: no volumes.csv, overlays or report.html


def _read_and_prepare(predictor: Predictor, case: InputCase, keep_probabilities: bool) -> PreparedCase:
    image, geometry = read_input_case(case, predictor.num_channels)
    source = case.files[0].parent if case.series_uid else case.files[0]
    return predictor.prepare(image, geometry, source, keep_probabilities)


def _predict(predictor: Predictor, prepared: PreparedCase, outputs: _Writing) -> CaseSegmentation | list[np.ndarray]:
    """The network part, in the main thread: the label map, or (to save probabilities) network-space logits."""
    if outputs.options.save_probabilities:
        return predictor.run_networks(prepared)
    return predictor.segment(prepared, entropy_map=outputs.options.save_uncertainty)


def _write_case(predictor: Predictor, case: InputCase, prepared: PreparedCase,
                predicted: CaseSegmentation | list[np.ndarray], outputs: _Writing) -> None:
    """Probabilities and uncertainty map (if asked), the label map (postprocessed), then the report row and
    overlay: an existing label map means the files --continue looks for are complete."""
    geometry = prepared.geometry
    if not isinstance(predicted, CaseSegmentation):
        save_probabilities(outputs.folder / f"{case.case_id}.npz", predictor.to_original(prepared, predicted))
        predicted = predictor.segment_logits(prepared, predicted, entropy_map=outputs.options.save_uncertainty)
    path = _output_path(outputs.folder, case, outputs.options.output_format)
    objects = None  # the instance map as written (with instance segmentation)
    if outputs.options.save_uncertainty and predicted.entropy is not None:
        suffix = segmentation_suffix(case.ending)
        suffix = ".tif" if suffix == ".png" else suffix  # a float map does not fit an 8-bit PNG
        write_image(outputs.folder / f"{case.case_id}_uncertainty{suffix}", predicted.entropy, geometry)
    if path.suffix == ".dcm":
        from autoseg.inference.dicom_seg import (
            write_dicom_seg,  # needs the optional highdicom
        )

        segmentation = (predicted.labels if outputs.rules is None
                        else apply_postprocessing(predicted.labels, outputs.rules))
        plans = predictor.plans
        write_dicom_seg(segmentation, geometry, case.files, outputs.labels, path,
                        regions=plans.scored_structures if plans.regions else None)
        if predicted.instances is not None:
            objects = np.where(segmentation > 0, predicted.instances, 0)
    else:
        segmentation = write_segmentation(predicted.labels, geometry, path, outputs.rules)
        if predicted.instances is not None:
            objects = write_instances(predicted.instances, segmentation, geometry, case.case_id, path, outputs.labels)
    if outputs.volumes is None:
        return
    uncertainty = predicted.uncertainty
    threshold = outputs.options.uncertainty_threshold
    flagged = None if uncertainty is None else {k for k, u in uncertainty.items() if u > threshold}
    outputs.volumes.add_case(case.case_id, case.files, structure_rows(segmentation, geometry, outputs.labels,
                                                                      predictor.plans.scored_structures),
                             uncertainty, flagged)
    from autoseg.inference.qc import (
        write_overlay,  # matplotlib, only when there is an overlay to draw
    )

    overlay = outputs.folder / "qc" / f"{case.case_id}.png"
    try:  # the input is read again: holding it through the prediction would cost memory
        write_overlay(read_input_case(case, predictor.num_channels)[0], segmentation, geometry, outputs.labels, overlay,
                      instances=objects)
    except Exception as exc:  # the label map and its row are written; a missing picture must not fail the case
        log.warning("%s: no overlay written: %s", overlay, _describe(exc))


def _run_pipeline(predictor: Predictor, cases: list[InputCase], outputs: _Writing, workers: int, progress: bool,
                  failed: list[tuple[str, str]], warnings: list[tuple[str, str]]) -> list[str]:
    """Network in this thread; reading/preprocessing ahead and writing behind in worker threads. Failed cases
    are added to `failed`, the input checks' warnings to `warnings`.

    At most `workers + 1` cases wait preprocessed and `workers + 1` wait to be written, so
    memory stays bounded however many cases there are.
    """
    written: list[str] = []
    ahead = max(1, workers) + 1
    readers = ThreadPoolExecutor(workers, thread_name_prefix="autoseg-read") if workers else _InlineExecutor()
    writers = ThreadPoolExecutor(workers, thread_name_prefix="autoseg-write") if workers else _InlineExecutor()
    reads: deque[tuple[InputCase, Future]] = deque()
    writes: deque[tuple[InputCase, Future]] = deque()
    pending = iter(cases)
    said_slice_by_slice = False
    bar = tqdm(total=len(cases), desc="predict", unit="case", disable=not progress)

    def finish_oldest_write() -> None:
        case, future = writes.popleft()
        try:
            future.result()
            written.append(case.case_id)
        except Exception as exc:
            path = _output_path(outputs.folder, case, outputs.options.output_format)
            failed.append((case.case_id, f"writing {path} failed: {_describe(exc)}"))
            log.debug("writing %s failed", case.case_id, exc_info=True)
        bar.update()

    try:
        while True:
            while len(reads) < ahead and (case := next(pending, None)) is not None:
                reads.append((case, readers.submit(_read_and_prepare, predictor, case,
                                                   outputs.options.save_probabilities)))
            if not reads:
                break
            case, future = reads.popleft()
            try:
                prepared = future.result()
            except InputError as exc:
                failed.append((str(exc.path), str(exc)))
                bar.update()
                continue
            except Exception as exc:
                failed.append((case.case_id, f"preprocessing failed: {_describe(exc)}"))
                log.debug("preprocessing %s failed", case.case_id, exc_info=True)
                bar.update()
                continue
            warnings += [(case.case_id, w) for w in prepared.check.warnings]
            if prepared.check.slice_by_slice and not said_slice_by_slice:
                log.info("%s: a 3D volume given to a model trained on 2D images: segmented slice by slice, each "
                         "slice as an image (said once for the run)", case.case_id)
                said_slice_by_slice = True
            try:
                predicted = _predict(predictor, prepared, outputs)
            except Exception as exc:  # e.g. out of memory on a very large case: the others may still fit
                failed.append((case.case_id, f"prediction failed: {_describe(exc)}"))
                log.debug("prediction of %s failed", case.case_id, exc_info=True)
                bar.update()
                continue
            # The network input is not needed any more; drop it so only the outputs wait for writing.
            prepared, future = replace(prepared, data=()), None
            writes.append((case, writers.submit(_write_case, predictor, case, prepared, predicted, outputs)))
            while len(writes) > ahead:
                finish_oldest_write()
        while writes:
            finish_oldest_write()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return written


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class _InlineExecutor:
    """`submit` runs the call at once; the same pipeline code then works without threads."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass
