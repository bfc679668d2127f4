"""Losses of the task kinds that have their own (segmentation, restoration)."""
