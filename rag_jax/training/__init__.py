"""Optimisers, train states and training loops."""
