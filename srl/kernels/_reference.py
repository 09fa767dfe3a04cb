"""The definition of attention every kernel is tested against: plain torch, float32 or float64."""
from __future__ import annotations

import torch

from srl.kernels._flash_common import check_inputs


def attention_reference(q, k, v, causal=False, sm_scale=None, kv_lens=None, kv_start=None, kv_prefix=None):
    """Plain torch attention; computes in float32 (float64 if the inputs are).

    Same semantics as :func:`flash_attention` (GQA, bottom-right causal mask,
    zeros for rows that see no key). ``kv_lens`` (B,) optionally limits the
    valid keys of each batch element (as in :func:`flash_decode`); ``kv_start``
    (B, Nq) hides the keys before ``kv_start[b, i]`` from query ``i``, except those before
    ``kv_prefix[b]`` (B,) when given.
    """
    check_inputs(q, k, v)
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    scale = D ** -0.5 if sm_scale is None else sm_scale
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf, kf, vf = q.to(cdt), k.to(cdt), v.to(cdt)
    if Hkv != H:  # (B, Hkv, Nk, D) -> (B, H, Nk, D)
        kf = kf.repeat_interleave(H // Hkv, dim=1)
        vf = vf.repeat_interleave(H // Hkv, dim=1)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # (B, H, Nq, Nk)
    cols = torch.arange(Nk, device=q.device)
    if kv_lens is None:
        n_valid = torch.full((B,), Nk, device=q.device, dtype=torch.long)
    else:
        n_valid = kv_lens.to(device=q.device, dtype=torch.long).clamp(0, Nk)
    # (B, 1, 1, Nk) key validity, then (B, 1, Nq, Nk) causal visibility
    mask = cols[None, None, None, :] < n_valid[:, None, None, None]
    if causal:
        rows = torch.arange(Nq, device=q.device)
        last = rows[None, :, None] + (n_valid[:, None, None] - Nq)  # (B, Nq, 1)
        mask = mask & (cols[None, None, None, :] <= last[:, None])
    if kv_start is not None:
        after = cols[None, None, None, :] >= kv_start.to(q.device, torch.long)[:, None, :, None]
        if kv_prefix is not None:
            after = after | (cols[None, None, None, :] < kv_prefix.to(q.device, torch.long)[:, None, None, None])
        mask = mask & after
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, vf).to(q.dtype)


# --------------------------------------------------------------------------
# Triton kernels: forward
# --------------------------------------------------------------------------
