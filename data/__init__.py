"""Data pipeline: raw readers -> canonical files -> history windows (see data/canonical.py for the format)."""
from data.canonical import Dataset, Interaction, Item, load_dataset
from data.io import DataError

__all__ = ["Dataset", "Interaction", "Item", "load_dataset", "DataError"]
