"""The U-Net built from a plan: topology record, network, and its memory cost for the planner.

`feature_map_elements` (cost.py) needs no torch; the network classes load torch on first use, so
importing the cost (as the planner does) stays fast.
"""

from autoseg.network.cost import feature_map_elements

_TORCH_NAMES = ("UNet", "UNetTopology", "build_unet", "deep_supervision_scales")


def __getattr__(name: str):
    if name in _TORCH_NAMES:
        from autoseg.network import unet

        return getattr(unet, name)
    raise AttributeError(f"module 'autoseg.network' has no attribute {name!r}")


__all__ = ["UNet", "UNetTopology", "build_unet", "deep_supervision_scales", "feature_map_elements"]
