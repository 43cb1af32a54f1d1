"""autoseg: self-configuring medical image segmentation (plan, train, predict)."""

__version__ = "0.1.0"

