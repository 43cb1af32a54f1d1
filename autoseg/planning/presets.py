"""Planning presets: nnU-Net's default U-Net plans and its residual-encoder presets ResEnc M, L and XL.

A preset fixes the network family and the memory model the planner fits patches and batches to.
The ResEnc presets are nnunetv2 2.8.1's `nnUNetPlannerResEncM` / `L` / `XL` ("nnU-Net Revisited",
Isensee et al., MICCAI 2024), which nnU-Net recommends trying first: a residual encoder (blocks per
stage 1, 3, 4, 6, 6, ...; one conv per decoder stage), each preset's own GPU memory target and
reference feature-map sizes, no cap of the batch at 5% of the dataset, and the patch shrunk until
the reference batch (2 in 3D, 12 in 2D) fits, where the default shrinks until batch 2 fits.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    name: str
    memory_gb: float  # default memory target (autoseg plan --memory-gb overrides it)
    reference_gb: float  # the memory the reference points below were measured to fit
    reference: dict[int, tuple[float, int]]  # ndim -> (conv output elements per sample, batch size) at reference_gb
    max_dataset_fraction_per_batch: float
    shrink_until_reference_batch_fits: bool  # ResEnc: shrink until the reference batch fits; default: batch 2
    residual_blocks: tuple[int, ...] = ()  # encoder blocks per stage, cut to the number of stages; () plain U-Net
    n_conv_per_stage_decoder: int | None = None
    description: str = ""

    @property
    def residual(self) -> bool:
        return bool(self.residual_blocks)

    def data_identifier(self, configuration: str) -> str:
        """Where a configuration's preprocessed data goes: 2d and 3d_fullres preprocess alike under every
        preset (as nnU-Net's ResEnc planners reuse nnUNetPlans' data), 3d_lowres has a spacing of its own."""
        if self.name == DEFAULT or configuration in ("2d", "3d_fullres"):
            return configuration
        return f"{configuration}_{self.name}"


DEFAULT = "default"
_RESENC_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
PRESETS = {
    DEFAULT: Preset(DEFAULT, 8.0, 8.0, {3: (560e6, 2), 2: (85e6, 12)}, 0.05, False,
                    description="nnU-Net's default plain U-Net (two convs per stage)"),
    "resenc-m": Preset("resenc-m", 8.0, 8.0, {3: (680e6, 2), 2: (135e6, 12)}, 1.0, True, _RESENC_BLOCKS, 1,
                       "residual encoder U-Net, 8 GB target (nnU-Net's ResEnc M)"),
    "resenc-l": Preset("resenc-l", 24.0, 24.0, {3: (2100e6, 2), 2: (380e6, 12)}, 1.0, True, _RESENC_BLOCKS, 1,
                       "residual encoder U-Net, 24 GB target (nnU-Net's ResEnc L)"),
    "resenc-xl": Preset("resenc-xl", 40.0, 40.0, {3: (3600e6, 2), 2: (560e6, 12)}, 1.0, True, _RESENC_BLOCKS, 1,
                        "residual encoder U-Net, 40 GB target (nnU-Net's ResEnc XL)"),
}
