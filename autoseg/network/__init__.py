"""The U-Net built from a plan: topology record, network, and its memory cost for the planner."""

from autoseg.network.unet import (
    UNet,
    UNetTopology,
    build_unet,
    deep_supervision_scales,
    feature_map_elements,
)

__all__ = ["UNet", "UNetTopology", "build_unet", "deep_supervision_scales", "feature_map_elements"]
