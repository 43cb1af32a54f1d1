"""What to do about the data: target spacing, patch, topology, batch size, normalization."""

from autoseg.planning.plans import PlanError

__all__ = ["PlanError"]
