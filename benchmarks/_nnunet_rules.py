"""Run by bench_rules_parity.py with nnunetv2's own Python: nnU-Net v2's training-time rules on the
inputs in IN.npz, their results written to OUT.json. Not imported by autoseg.

    <nnunet-venv>/bin/python _nnunet_rules.py IN.npz OUT.json WORKDIR
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np


def patch_boxes(inputs: np.lib.npyio.NpzFile) -> list:
    """For each (shape, read patch, final patch, voxel or -1s) row: nnU-Net's get_bbox.

    Random placement: the (lowest, highest) corner that np.random.randint is asked for. Forced
    placement: the corner it returns for a case whose only stored voxel is `voxel`."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

    loader = nnUNetDataLoader.__new__(nnUNetDataLoader)
    loader.has_ignore, loader.annotated_classes_key = False, (-1, 0, 1)
    asked: list[tuple[int, int]] = []
    real_randint = np.random.randint

    def record(low, high):
        asked.append((int(low), int(high) - 1))
        return int(low)

    results = []
    for shape, read, final, voxel in zip(inputs["box_shape"], inputs["box_read"], inputs["box_final"],
                                         inputs["box_voxel"]):
        loader.patch_size = [int(p) for p in read]
        loader.need_to_pad = (np.array(read) - np.array(final)).astype(int)
        if voxel[0] < 0:
            asked.clear()
            np.random.randint = record
            try:
                loader.get_bbox(np.array(shape), False, None)
            finally:
                np.random.randint = real_randint
            results.append({"range": [list(pair) for pair in asked]})
        else:
            locations = {1: np.array([[0, *voxel]])}
            lower, _ = loader.get_bbox(np.array(shape), True, locations)
            results.append({"forced": [int(v) for v in lower]})
    return results


def foreground_locations(inputs: np.lib.npyio.NpzFile) -> list:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    results = []
    for key in sorted(k for k in inputs.files if k.startswith("seg_")):
        seg = inputs[key]
        ignore = int(inputs[f"ignore_{key}"]) if f"ignore_{key}" in inputs.files else None
        labels = sorted(int(v) for v in np.unique(seg) if v > 0 and v != ignore)
        classes = labels if ignore is None else labels + [[-1] + list(range(ignore))]  # as its preprocessor asks
        locations = DefaultPreprocessor._sample_foreground_locations(seg[None], classes, seed=1234)
        results.append({("annotated" if isinstance(label, tuple) else str(label)): np.asarray(coords)[:, 1:].tolist()
                        for label, coords in locations.items() if len(coords)})
    return results


def largest_components(inputs: np.lib.npyio.NpzFile) -> list:
    from acvl_utils.morphology.morphology_helper import remove_all_but_largest_component

    return [np.flatnonzero(remove_all_but_largest_component(inputs[key])).tolist()
            for key in sorted(k for k in inputs.files if k.startswith("mask_"))]


def postprocessing_decisions(inputs: np.lib.npyio.NpzFile, workdir: Path) -> list:
    """nnU-Net's determine_postprocessing on each trial's prediction and reference folders (NIfTI)."""
    import SimpleITK as sitk
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    results = []
    trials = sorted({k.split("_")[1] for k in inputs.files if k.startswith("pred_")})
    for trial in trials:
        pred_dir, ref_dir = workdir / f"trial{trial}" / "pred", workdir / f"trial{trial}" / "ref"
        pred_dir.mkdir(parents=True)
        ref_dir.mkdir(parents=True)
        cases = sorted(k for k in inputs.files if k.startswith(f"pred_{trial}_"))
        labels = set()
        for key in cases:
            case = key.split("_")[2]
            pred, ref = inputs[key], inputs[f"ref_{trial}_{case}"]
            labels |= {int(v) for v in np.unique(ref) if v > 0}
            sitk.WriteImage(sitk.GetImageFromArray(pred.astype(np.uint8)), str(pred_dir / f"c{case}.nii.gz"))
            sitk.WriteImage(sitk.GetImageFromArray(ref.astype(np.uint8)), str(ref_dir / f"c{case}.nii.gz"))
        labels = sorted(labels | {int(v) for v in inputs[f"labels_{trial}"]})
        dataset = {"labels": {"background": 0, **{f"l{label}": label for label in labels}},
                   "file_ending": ".nii.gz", "channel_names": {"0": "MRI"}, "numTraining": len(cases)}
        plans = {"image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager"}
        determine_postprocessing(str(pred_dir), str(ref_dir), plans, dataset, num_processes=1,
                                 keep_postprocessed_files=False)
        with open(pred_dir / "postprocessing.pkl", "rb") as f:
            _, kwargs = pickle.load(f)
        foreground = any(isinstance(k["labels_or_regions"], (list, tuple)) for k in kwargs)
        per_label = [int(k["labels_or_regions"]) for k in kwargs if not isinstance(k["labels_or_regions"],
                                                                                  (list, tuple))]
        results.append({"foreground_largest_component": foreground, "largest_component_labels": per_label})
    return results


def main(argv: list[str]) -> None:
    source, target, workdir = Path(argv[0]), Path(argv[1]), Path(argv[2])
    inputs = np.load(source)
    out = {"boxes": patch_boxes(inputs), "locations": foreground_locations(inputs),
           "components": largest_components(inputs), "postprocessing": postprocessing_decisions(inputs, workdir)}
    target.write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
