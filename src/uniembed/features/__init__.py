"""Frozen-feature extraction and the on-disk feature cache."""
