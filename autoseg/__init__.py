"""autoseg: self-configuring medical image segmentation (plan, train, predict)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """`autoseg.load_model` (the Python API, autoseg/inference/api.py), imported on first use: `import autoseg`
    stays light."""
    if name in ("load_model", "SegmentationModel", "Segmentation"):
        from autoseg.inference import api

        return getattr(api, name)
    raise AttributeError(f"module 'autoseg' has no attribute {name!r}")
