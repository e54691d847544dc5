"""attnkit.core: the pieces every mechanism is made of (masks, score mods, normalizers), validation, and the record
of what ran. Imports no other attnkit module."""
from . import masks, normalizers, scores

__all__ = ["masks", "scores", "normalizers"]
