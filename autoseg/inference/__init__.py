"""Inference: sliding-window prediction with Gaussian weighting and mirroring, fold ensembles, export."""
