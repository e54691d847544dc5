"""Multi-Token Attention (Golovneva et al. 2025): a learned convolution over the score map.

    S  = scale · Q Kᵀ                                       [B, Hq, Lq, Lk]
    S0 = Mask_0(S)            (masked entries set to 0)
    C[i, j] = Σ_{a<cq} Σ_{c<ck} θ_h[a, c] · S0[i − a, j + ⌊ck/2⌋ − c]   (0 outside the matrix)
    C' = Σ_{h' in group(h)} U[group, h, h'] · C_h'           (optional pre-softmax head mixing)
    A  = normalizer(Mask_−∞(C'))                            (softmax by default)
    Â_h = Σ_{h' in group(h)} W[group, h, h'] · A_h'         (optional post-softmax head mixing)
    O_h = Â_h V_h

Queries only look back (rows i − a), keys are centred (columns j − ⌊(ck−1)/2⌋ … j + ⌊ck/2⌋), so
under a causal mask no weight depends on a future key: Mask_0 zeroes every future score before the
convolution reads it.

Everything runs on the shared softmax engine (:mod:`attnkit.ops.softmax`): :class:`MTACall`
overrides ``scores`` and declares the halo a block reads (cq − 1 earlier query rows, ⌊(ck−1)/2⌋ keys
to the left and ⌊ck/2⌋ to the right), so the materialized, streaming and recurrent forms and their
backward passes are the engine's own. Head mixing is linear in the weights,
``O_h = Σ_h' W[h, h'] · (A_h' V_h)``, so one engine pass with the values of a group concatenated
along the value dim gives every ``A_h' V_h`` at once (no second pass).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import masks as M
from ...core.masks import MaskLike
from ...core.normalizers import Normalizer, as_normalizer
from ...core.validation import AUTO_DENSE_LIMIT, FORMS, check_qkv, resolve_scale
from .. import softmax as _sm
from ..softmax.reference import run_reference

__all__ = ["multi_token_attention", "MTACall"]


class MTACall(_sm.Call):
    """Engine call whose scores are the key-query convolution ``C`` of the masked score map."""

    def __init__(self, q, k, v, mask, score_mod, normalizer, scale, *, kernel: Tensor,
                 pre_mix: Optional[Tensor] = None):
        super().__init__(q, k, v, mask, score_mod, normalizer, scale)
        cq, ck = kernel.shape[1:]
        self.kernel, self.pre_mix = kernel, pre_mix
        self.halo_q = cq - 1
        self.halo_k = (ck - 1 - ck // 2, ck // 2)

    def scores(self, qx, kx, r0, r1, c0, c1, qa, ka):
        kb = ka + kx.shape[2]
        s = self.dot(qx, kx, None if self.finite_qk else self.mask_block(qa, r1, ka, kb))  # rows [qa, r1) x [ka, kb)
        s0 = torch.where(self.mask_block(qa, r1, ka, kb), s, torch.zeros((), dtype=s.dtype, device=s.device))
        # zero rows / columns outside the matrix so the window of every output entry is complete
        s0 = F.pad(s0, (self.halo_k[0] - (c0 - ka), self.halo_k[1] - (kb - c1), self.halo_q - (r0 - qa), 0))
        # conv2d is a cross-correlation: flipping θ turns it into C[i,j] = Σ θ[a,c]·S0[i−a, j+⌊ck/2⌋−c]
        w = self.kernel.to(s.dtype).flip((1, 2)).unsqueeze(1)
        c = F.conv2d(s0, w, groups=self.Hq)
        if self.pre_mix is not None:  # the block holds every head, so mixing needs no extra pass
            c = _mix(self.pre_mix, c, self.pre_mix.shape[1])
        return c

    def params(self):
        own = [t for t in (self.kernel, self.pre_mix) if t is not None and t.requires_grad]
        return own + super().params()


def _check_param(name: str, t, q: Tensor, ndim: int, want: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {want}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    return t


def _mix_plan(Hq: int, Hkv: int, g: int) -> Tuple[int, int]:
    """``(Ge, n)``: query heads per engine K/V head and distinct value heads per mixing group.

    If mixing groups and GQA groups nest (one divides the other) the engine keeps the caller's K/V
    heads (``Ge = Hq // Hkv``); otherwise K/V are repeated to ``Hq`` heads (``Ge = 1``).
    """
    G = Hq // Hkv
    Ge = G if (g % G == 0 or G % g == 0) else 1
    return Ge, max(1, g // Ge)


def _grouped_values(k: Tensor, v: Tensor, Hq: int, g: int):
    """K and the concatenated values ``V_cat`` for one engine pass with head mixing in groups of ``g``.

    Engine head ``u`` gets ``[v_{u0}, …, v_{u0+n−1}]`` along the value dim, the ``n`` distinct value
    heads of its mixing group. Returns ``(k, v_cat, Ge, n)``.
    """
    Ge, n = _mix_plan(Hq, k.shape[1], g)
    if Ge != Hq // k.shape[1]:
        rep = Hq // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if n > 1:
        B, Hk, Lk, Dv = v.shape
        cat = v.view(B, Hk // n, n, Lk, Dv).permute(0, 1, 3, 2, 4).reshape(B, Hk // n, 1, Lk, n * Dv)
        v = cat.expand(B, Hk // n, n, Lk, n * Dv).reshape(B, Hk, Lk, n * Dv)
    return k, v, Ge, n


def _mix(W: Tensor, x: Tensor, g: int) -> Tensor:
    """``x̂_h = Σ_{h' in group} W[group, h, h'] x_h'`` over dim 1 of ``x [B, Hq, ...]``."""
    B, Hq = x.shape[:2]
    xg = x.reshape(B, Hq // g, g, -1)
    return torch.einsum("nhl,bnlz->bnhz", W.to(x.dtype), xg).reshape(x.shape)


def multi_token_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel: Tensor,
    *,
    mask: MaskLike = M.causal,
    head_mix: Optional[Tensor] = None,
    head_mix_pre: Optional[Tensor] = None,
    scale: Optional[float] = None,
    normalizer: Union[str, Normalizer] = "softmax",
    form: str = "auto",
    layout: str = "bhtd",
    return_weights: bool = False,
    block_q: Optional[int] = None,
    block_k: Optional[int] = None,
):
    """Multi-Token Attention: per-head 2-D convolution over the masked score map, then the normalizer.

    ``C[i,j] = Σ_{a<cq, c<ck} θ_h[a,c] · S0[i−a, j+⌊ck/2⌋−c]`` with ``S0 = Mask_0(scale·QKᵀ)`` (zero
    outside the matrix); ``A = normalizer(Mask_−∞(C))``; optional post-softmax head mixing
    ``Â_h = Σ_{h' in group} W[group, h, h'] A_h'``; ``O_h = Â_h V_h``.

    Args:
        q: ``[B, Hq, Lq, D]``; k: ``[B, Hkv, Lk, D]``; v: ``[B, Hkv, Lk, Dv]`` (``layout="bthd"``:
            ``[B, T, H, ·]``); GQA / MQA as in :func:`attnkit.attention`.
        kernel: θ ``[Hq, cq, ck]`` (may require grad): cq query rows back, ck keys centred on j.
        mask: any :mod:`attnkit.masks` mask (default causal, end-aligned for Lq != Lk).
        head_mix: W ``[Hq/g, g, g]`` mixing the weights of groups of g consecutive heads after the
            normalizer (may require grad), or None.
        head_mix_pre: U ``[Hq/g', g', g']`` mixing the convolved scores of groups of g' heads before
            Mask_−∞ and the normalizer (the paper's pre-softmax head convolution), or None.
        scale: defaults to 1/sqrt(D).
        normalizer: any softmax-family or elementwise normalizer of :func:`attnkit.attention`.
        form: 'materialized', 'streaming' (online softmax over (block_q x block_k) tiles plus halo,
            custom backward, O(block²) memory; None blocks take the engine's default tile),
            'recurrent' (token by token; keeps the last cq − 1 queries; masks without look-ahead)
            or 'auto'.
        return_weights: also return Â ``[B, Hq, Lq, Lk]`` (materialized form).

    Returns:
        ``out`` ``[B, Hq, Lq, Dv]`` in q's dtype and layout, or ``(out, weights)``. Rows with no
        visible key give zeros. The paper's GroupNorm with depth scaling belongs to layers. With head mixing in groups that do not nest with the GQA
        groups, K/V are repeated to Hq heads; in general the value dim of the pass grows to
        n·Dv, n = number of distinct value heads in a mixing group.
    """
    q, k, v = check_qkv(q, k, v, layout)
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    kernel = _check_param("kernel", kernel, q, 3, "θ of shape [Hq, cq, ck]")
    if kernel.shape[0] != Hq or kernel.shape[1] < 1 or kernel.shape[2] < 1:
        raise ValueError(f"kernel must be [Hq={Hq}, cq>=1, ck>=1], got shape {tuple(kernel.shape)}")
    g = 1
    if head_mix is not None:
        head_mix = _check_param("head_mix", head_mix, q, 3, "W of shape [Hq/g, g, g]")
        g = head_mix.shape[1]
        if g < 1 or head_mix.shape[2] != g or head_mix.shape[0] * g != Hq:
            raise ValueError(f"head_mix must be [Hq/g, g, g] with Hq={Hq}, got shape {tuple(head_mix.shape)}")
    if head_mix_pre is not None:
        head_mix_pre = _check_param("head_mix_pre", head_mix_pre, q, 3, "U of shape [Hq/g, g, g]")
        gp = head_mix_pre.shape[1]
        if gp < 1 or head_mix_pre.shape[2] != gp or head_mix_pre.shape[0] * gp != Hq:
            raise ValueError(f"head_mix_pre must be [Hq/g, g, g] with Hq={Hq}, got shape {tuple(head_mix_pre.shape)}")
    mask = M.as_mask(mask)
    normalizer = as_normalizer(normalizer)
    scale = resolve_scale(scale, D)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "auto":
        form = "materialized" if return_weights or B * Hq * Lq * Lk <= AUTO_DENSE_LIMIT else "streaming"
    if return_weights and form != "materialized":
        raise ValueError(f"return_weights needs form='materialized', got form={form!r}")
    dtype = q.dtype
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = q.to(cd), k.to(cd), v.to(cd)
    n = 1
    if head_mix is not None:
        k, v, Ge, n = _grouped_values(k, v, Hq, g)
    form_kw = {}
    if form == "streaming":  # None: the engine's default tile
        form_kw = {name: b for name, b in (("block_q", block_q), ("block_k", block_k)) if b is not None}
    call_cls = functools.partial(MTACall, kernel=kernel, pre_mix=head_mix_pre)
    res = run_reference(q, k, v, mask, None, normalizer, scale, form, False, return_weights, "bhtd",
                     call_cls=call_cls, **form_kw)
    out, weights = res if return_weights else (res, None)
    if head_mix is not None:
        Dv = v.shape[-1] // n
        # each output head h reads slot (h mod g) // Ge of every A_h'·V_cat in its group
        slot = torch.arange(g, device=out.device) // Ge
        oc = out.reshape(B, Hq // g, g, Lq, n, Dv)[:, :, :, :, slot]  # [B, Hq/g, g(h'), Lq, g(h), Dv]
        out = torch.einsum("nhl,bnlqhd->bnhqd", head_mix.to(cd), oc).reshape(B, Hq, Lq, Dv)
        if weights is not None:
            weights = _mix(head_mix, weights, g)
    out = out.to(dtype)
    if layout == "bthd":
        out = out.transpose(1, 2)
    return (out, weights) if return_weights else out
