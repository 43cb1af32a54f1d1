"""Run with nnU-Net's Python: write an nnU-Net v2 model folder (plans.json, dataset.json, fold_0 with a
checkpoint of random weights) whose 3d_fullres configuration has the patch, spacing and U-Net topology
of an autoseg plans.json, so that `nnUNetv2_predict_from_modelfolder` does the same work as autoseg.

    python _nnunet_model_folder.py AUTOSEG_PLANS_JSON MODEL_FOLDER

Used by bench_predict.py --large; the weights are random (they change the labels, not the work).
"""

import json
import sys
from pathlib import Path

import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

ARCHITECTURE = "dynamic_network_architectures.architectures.unet.PlainConvUNet"


def nnunet_plans(ours: dict) -> dict:
    config = ours["configurations"]["3d_fullres"]
    stages = len(config["features_per_stage"])
    stats = ours.get("normalization", [{}])[0]
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    return {
        "dataset_name": "Dataset990_SyntheticCT", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": config["spacing"],
        "original_median_shape_after_transp": config.get("median_image_size_in_voxels", config["patch_size"]),
        "image_reader_writer": "SimpleITKIO", "transpose_forward": ours["transpose_forward"],
        "transpose_backward": ours["transpose_backward"],
        "configurations": {"3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": config["batch_size"], "patch_size": config["patch_size"],
            "median_image_size_in_voxels": config.get("median_image_size_in_voxels", config["patch_size"]),
            "spacing": config["spacing"], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": resampling,
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
            "architecture": {"network_class_name": ARCHITECTURE, "arch_kwargs": {
                "n_stages": stages, "features_per_stage": config["features_per_stage"],
                "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": config["kernel_sizes"],
                "strides": config["strides"], "n_conv_per_stage": [2] * stages,
                "n_conv_per_stage_decoder": [2] * (stages - 1), "conv_bias": True,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
                "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": False}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "mean": stats.get("mean", 40.0), "std": stats.get("std", 60.0), "min": -200.0, "max": 400.0,
            "median": 40.0, "percentile_00_5": stats.get("lower", -100.0),
            "percentile_99_5": stats.get("upper", 250.0)}},
    }


def main() -> None:
    ours = json.loads(Path(sys.argv[1]).read_text())
    folder = Path(sys.argv[2])
    plans = nnunet_plans(ours)
    labels = {name: int(k) for k, name in ours["labels"].items()}
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 20, "file_ending": ".mha"}
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(0)
    network = get_network_from_plans(ARCHITECTURE, arch["arch_kwargs"], arch["_kw_requires_import"], 1, len(labels),
                                     allow_init=True, deep_supervision=False)
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                              "device": "cpu"},
                "inference_allowed_mirroring_axes": (0, 1, 2), "current_epoch": 0},
               folder / "fold_0" / "checkpoint_final.pth")
    print(f"nnU-Net model folder: {folder}")


if __name__ == "__main__":
    main()
