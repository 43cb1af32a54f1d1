"""Doing what the plan says: crop, resample, normalize, store."""
