"""attnkit.ops.simplicial: 2-simplicial (trilinear) attention (Clift et al. 2019; Roy et al. 2025)."""
from .reference import WINDOW1, WINDOW2, simplicial_attention

__all__ = ["simplicial_attention", "WINDOW1", "WINDOW2"]
