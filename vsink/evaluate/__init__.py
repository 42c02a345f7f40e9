"""Evaluations: dense prediction (linear-probe segmentation, LOST, artifact metrics)."""
