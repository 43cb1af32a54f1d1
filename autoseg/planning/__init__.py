"""What to do about the data: target spacing, patch, topology, batch size, normalization."""


class PlanError(Exception):
    """Plans that cannot be made or read; the message says why and what to do."""
