"""Driver run with nnunetv2's own Python by bench_predict_parity.py; not part of autoseg.

Writes an nnU-Net v2 model folder that holds an autoseg fold's trained weights, so that
`nnUNetv2_predict_from_modelfolder` predicts with exactly the network autoseg predicts with:

    python _nnunet_from_autoseg.py AUTOSEG_WORKDIR CONFIGURATION FOLD MODEL_FOLDER CHECK_NPZ

plans.json gets autoseg's plan for CONFIGURATION (spacing, patch, topology, normalization, transpose,
nnU-Net's resampling functions); fold_<FOLD>/checkpoint_final.pth gets autoseg's `network_state`
copied into nnU-Net's PlainConvUNet layer by layer (autoseg's convolutions have no bias, since the
InstanceNorm after them removes it, so nnU-Net's conv biases are set to 0). CHECK_NPZ must hold an
input batch `x`; the driver adds nnU-Net's logits for it as `logits`, so the caller can check that both
networks compute the same function.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

ARCHITECTURE = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
SCHEMES = {"zscore": "ZScoreNormalization", "ct": "CTNormalization", "noNorm": "NoNormalization",
           "rescale_to_0_1": "RescaleTo01Normalization", "rgb_to_0_1": "RGBTo01Normalization"}


def reader_for(file_ending: str, ndim: int) -> str:
    """nnU-Net's reader of the images the autoseg dataset holds: its natural-image reader for 2D PNG, BMP and TIFF
    (which takes a colour image as all its channels, as it trained on them), SimpleITK's for the rest."""
    if file_ending in (".png", ".bmp") or (file_ending in (".tif", ".tiff") and ndim == 2):
        return "NaturalImage2DIO"
    return "Tiff3DIO" if file_ending in (".tif", ".tiff") else "SimpleITKIO"


def nnunet_plans(ours: dict, fingerprint: dict, configuration: str, reader: str = "SimpleITKIO") -> dict:
    config = ours["configurations"][configuration]
    ndim = len(config["patch_size"])
    stages = len(config["features_per_stage"])
    r = ours["resampling"]
    data_kwargs = {"is_seg": False, "order": r["image_order"], "order_z": r["thick_axis_order"],
                   "force_separate_z": None}
    conv = f"torch.nn.modules.conv.Conv{ndim}d"
    norm = f"torch.nn.modules.instancenorm.InstanceNorm{ndim}d"
    return {
        "dataset_name": "Dataset991_AutosegModel", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": config["spacing"],
        "original_median_shape_after_transp": config["median_shape"],
        "image_reader_writer": reader, "transpose_forward": ours["transpose_forward"],
        "transpose_backward": ours["transpose_backward"],
        "configurations": {configuration: {
            "data_identifier": f"nnUNetPlans_{configuration}", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": config["batch_size"], "patch_size": config["patch_size"],
            "median_image_size_in_voxels": config["median_shape"], "spacing": config["spacing"],
            "normalization_schemes": [SCHEMES[n["scheme"]] for n in ours["normalization"]],
            "use_mask_for_norm": [bool(n["use_nonzero_mask"]) for n in ours["normalization"]],
            "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": data_kwargs,
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_seg_kwargs": {**data_kwargs, "is_seg": True, "order": r["label_order"]},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {**data_kwargs, "order": 1},
            "architecture": {"network_class_name": ARCHITECTURE, "arch_kwargs": {
                "n_stages": stages, "features_per_stage": config["features_per_stage"], "conv_op": conv,
                "kernel_sizes": config["kernel_sizes"], "strides": config["strides"],
                "n_conv_per_stage": [config["n_conv_per_stage"]] * stages,
                "n_conv_per_stage_decoder": [config["n_conv_per_stage"]] * (stages - 1), "conv_bias": True,
                "norm_op": norm, "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
            "batch_dice": config["batch_dice"]}},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(i): s for i, s in
                                                        enumerate(fingerprint["foreground_intensities"])},
    }


def copy_weights(network: torch.nn.Module, state: dict[str, torch.Tensor], n_conv: int) -> None:
    """autoseg's UNet state into nnU-Net's PlainConvUNet. autoseg indexes decoder stages by the encoder
    stage whose resolution they work at (0 = full resolution); nnU-Net from the coarsest up."""
    def block(target, prefix: str) -> None:
        target.conv.weight.copy_(state[f"{prefix}.0.weight"])
        target.conv.bias.zero_()
        target.norm.weight.copy_(state[f"{prefix}.1.weight"])
        target.norm.bias.copy_(state[f"{prefix}.1.bias"])

    encoder_stages = network.encoder.stages
    for s, stage in enumerate(encoder_stages):
        for j in range(n_conv):
            block(stage[0].convs[j], f"encoder.stages.{s}.{j}")
    decoder = network.decoder
    last = len(decoder.stages) - 1
    for k in range(len(decoder.stages)):
        i = last - k  # autoseg's index for nnU-Net's k-th decoder stage
        decoder.transpconvs[k].weight.copy_(state[f"decoder.upsample.{i}.weight"])
        decoder.transpconvs[k].bias.copy_(state[f"decoder.upsample.{i}.bias"])
        for j in range(n_conv):
            block(decoder.stages[k].convs[j], f"decoder.stages.{i}.{j}")
        decoder.seg_layers[k].weight.copy_(state[f"decoder.heads.{i}.weight"])
        decoder.seg_layers[k].bias.copy_(state[f"decoder.heads.{i}.bias"])


def main() -> None:
    workdir, configuration, fold = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    folder, check = Path(sys.argv[4]), Path(sys.argv[5])
    ours = json.loads((workdir / "plans.json").read_text())
    fingerprint = json.loads((workdir / "fingerprint.json").read_text())
    source = workdir / "dataset.json"  # the workspace's copy of the dataset's description
    ending = json.loads(source.read_text()).get("file_ending", ".nii.gz") if source.is_file() else ".nii.gz"
    plans = nnunet_plans(ours, fingerprint, configuration,
                         reader_for(ending, len(ours["configurations"][configuration]["patch_size"])))
    labels = {name: int(k) for k, name in ours["labels"].items()}
    dataset = {"channel_names": {str(i): n for i, n in enumerate(ours["channel_names"])}, "labels": labels,
               "numTraining": len(fingerprint["cases"]), "file_ending": ending}
    arch = plans["configurations"][configuration]["architecture"]
    network = get_network_from_plans(ARCHITECTURE, arch["arch_kwargs"], arch["_kw_requires_import"],
                                     len(ours["channel_names"]), len(labels), allow_init=True, deep_supervision=False)
    checkpoint = torch.load(workdir / "models" / configuration / f"fold_{fold}" / "checkpoint_final.pt",
                            map_location="cpu", weights_only=True)
    with torch.no_grad():
        copy_weights(network, checkpoint["network_state"], ours["configurations"][configuration]["n_conv_per_stage"])
    network.eval()
    with torch.no_grad():
        x = torch.from_numpy(np.load(check)["x"])
        logits = network(x).numpy()
    np.savez(check, x=x.numpy(), logits=logits)
    (folder / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    ndim = len(ours["configurations"][configuration]["patch_size"])
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": plans, "configuration": configuration, "fold": fold, "dataset_json": dataset,
                              "device": "cpu"},
                "inference_allowed_mirroring_axes": tuple(range(ndim)), "current_epoch": 0},
               folder / f"fold_{fold}" / "checkpoint_final.pth")
    print(f"nnU-Net model folder: {folder}")


if __name__ == "__main__":
    main()
