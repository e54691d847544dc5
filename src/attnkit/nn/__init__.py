"""Layers and models built on attnkit's operations.

    from attnkit.nn import Attention, LinearAttention, HybridLM, HybridConfig
    layer = Attention(512, 8, n_kv_heads=2, qk_norm=True, variant="softcap")
    model = HybridLM(HybridConfig(vocab_size=32000, d_model=512, n_heads=8, layers="LLLA" * 3))

Layers: :class:`Attention` (softmax family), :class:`LinearAttention` (every linear state rule), the head
structures of :mod:`attnkit.nn.heads`, :class:`Block` and :class:`HybridLM`. Every layer maps
``[B, T, d_model] -> [B, T, d_model]`` and takes ``cache=`` (:mod:`attnkit.cache`) and ``cu_seqlens=``.
"""
from .attention import Attention
from .blocks import Block, SwiGLU
from .heads import (DCMHA, MFA, MLA, SQA, DiffAttention, MoHAttention, MultiTokenAttention, SimplicialAttention,
                    TalkingHeadsAttention, lambda_init)
from .linear import LinearAttention, LinearState, ShortConv
from .model import HybridConfig, HybridLM
from .norm import GatedRMSNorm, RMSNorm
from .rope import RotaryEmbedding

__all__ = ["Attention", "LinearAttention", "LinearState", "ShortConv", "MLA", "MFA", "SQA", "MoHAttention",
           "TalkingHeadsAttention", "DCMHA", "DiffAttention", "MultiTokenAttention", "SimplicialAttention",
           "lambda_init", "Block", "SwiGLU", "HybridLM", "HybridConfig", "RMSNorm", "GatedRMSNorm", "RotaryEmbedding"]
