"""attnkit.ops.multitoken: Multi-Token Attention (Golovneva et al. 2025), a convolution over the score map."""
from .reference import multi_token_attention

__all__ = ["multi_token_attention"]
