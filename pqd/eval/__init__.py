"""Evaluation: FID with clean-fid (feature extractors, reference statistics) and per-image comparisons."""
