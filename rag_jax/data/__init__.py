"""Datasets, task readers and synthetic data."""
