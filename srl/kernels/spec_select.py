"""Standard speculative sampling's selection at small batch in a few launches, from logits.

In torch, one standard (k = 1) iteration builds full-vocabulary probability tensors for the
target (B, 1 + L, V) and the draft (B, L, V), then about fifty small kernels: ratios, the
accepted prefix, the residual max(p - q, 0), its normalisation, a draw, the policy's
log-probabilities, the state write and the bookkeeping. At batch 1 every one of them costs a launch
slot. Here the probabilities are never stored: every kernel recomputes softmax(x / T) at the
entries it needs from the bf16 logits and per-row (max, sum) statistics.

- draft steps: ``draft_merge`` finishes the exponential race whose per-chunk stage
  (``decode_step._sample_chunks``, or the small-batch head's fused epilogue) ran over the draft's
  logits, and stores the drawn token and the row's (max, sum of exp) for later;
- ``verify_select`` (four launches): per vocabulary chunk the (max, sum) of each of the 1 + L target
  rows; per row the acceptance of the drafted tokens (u < p / q) and the accepted prefix length
  n; per chunk the race for the emitted token over max(p_n - q_n, 0) (or p_L after L accepted
  tokens) and over p_n (the fallback where the residual has no mass); per row the winner, the
  emitted tokens and the policy's log-probabilities written to the generation state, the lengths
  advanced, the statistics counted.

The random numbers are the torch path's (``speculative.speculative_verify_block``): u (B, L)
uniform and one (B, V) Exp(1) draw for the emitted token, from the caller's generator in the same
order, so both paths draw the same tokens up to rounding.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from srl.kernels.decode_step import merge_race

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CHUNK = 2048
"""Vocabulary entries per program of the chunked passes (as ``decode_step.SAMPLE_BLOCK``)."""


def chunk_size() -> int:
    return 64 if INTERPRET else CHUNK


@triton.jit
def _draft_merge(PART, DRAFTS, DSTAT, t, stride_d, N_CHUNKS, CHUNKS_P2: tl.constexpr):
    """Program b: merge the chunks of PART (B, N_CHUNKS, 4) as ``decode_step._sample_write``
    does; DRAFTS[b, t] = the token, DSTAT[t, b] = (max, sum of exp) of logits / T."""
    b = tl.program_id(0).to(tl.int64)
    B = tl.num_programs(0)
    y, m, l_sum, _top = merge_race(PART, b, N_CHUNKS, False, CHUNKS_P2)
    tl.store(DRAFTS + b * stride_d + t, y)
    tl.store(DSTAT + (t * B + b) * 2, m)
    tl.store(DSTAT + (t * B + b) * 2 + 1, l_sum)


def draft_merge(part: Tensor, drafts: Tensor, dstat: Tensor, t: int) -> None:
    """Token t of each row's draft block from the race's chunk stage ``part`` (B, chunks, 4):
    drafts (B, L) int64 column t, and dstat (L, B, 2) float32 row t = (max, sum of exp)."""
    B, chunks = part.shape[0], part.shape[1]
    if dstat.shape[1:] != (B, 2) or dstat.dtype != torch.float32 or drafts.dtype != torch.int64:
        raise ValueError(f"draft_merge: dstat must be float32 (L, {B}, 2), drafts int64 (B, L); got "
                         f"{tuple(dstat.shape)} {dstat.dtype}, {drafts.dtype}")
    _draft_merge[(B,)](part, drafts, dstat, t, drafts.stride(0), chunks,
                       CHUNKS_P2=max(triton.next_power_of_2(chunks), 2), num_warps=1)


@triton.jit
def _target_chunks(TL, TPART, V, temp, R, N_CHUNKS, BLOCK_V: tl.constexpr):
    """Program (b, c): (max, sum of exp) of logits / T over chunk c of each of the R rows of
    TL[b] (R, V): TPART (B, R, N_CHUNKS, 2)."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    for j in range(R):
        x = tl.load(TL + (b * R + j) * V + offs, mask=ok, other=float("-inf")).to(tl.float32) / temp
        m = tl.max(x, 0)
        out = TPART + ((b * R + j) * N_CHUNKS + c) * 2
        tl.store(out, m)
        tl.store(out + 1, tl.sum(tl.exp(x - m), 0))


@triton.jit
def _merge_stat(TPART, row, N_CHUNKS, CHUNKS_P2: tl.constexpr):
    """(max, sum of exp) of one row from its chunk partials."""
    cs = tl.arange(0, CHUNKS_P2)
    c_ok = cs < N_CHUNKS
    m_c = tl.load(TPART + (row * N_CHUNKS + cs) * 2, mask=c_ok, other=float("-inf"))
    m = tl.max(m_c, 0)
    l_c = tl.load(TPART + (row * N_CHUNKS + cs) * 2 + 1, mask=c_ok, other=0.0)
    return m, tl.sum(tl.where(c_ok, l_c * tl.exp(m_c - m), 0.0), 0)


@triton.jit
def _accept(TL, TPART, TSTAT, DL, DSTAT, DRAFTS, U, NACC, V, temp, L, N_CHUNKS,
            CHUNKS_P2: tl.constexpr):
    """Program b: the target's (max, sum) per row into TSTAT (B, L + 1, 2); the accepted prefix
    length n = number of leading t with u_t < p_t(d_t) / q_t(d_t) (1 where q = 0 < p) into NACC."""
    b = tl.program_id(0).to(tl.int64)
    B = tl.num_programs(0)
    R = L + 1
    n = tl.program_id(0) * 0  # int32 scalars carried through the loop
    alive = n + 1
    for j in range(R):
        m, l_sum = _merge_stat(TPART, b * R + j, N_CHUNKS, CHUNKS_P2)
        tl.store(TSTAT + (b * R + j) * 2, m)
        tl.store(TSTAT + (b * R + j) * 2 + 1, l_sum)
        if j < L:
            d = tl.load(DRAFTS + b * L + j)
            pd = tl.exp(tl.load(TL + (b * R + j) * V + d).to(tl.float32) / temp - m) / l_sum
            dm = tl.load(DSTAT + (j * B + b) * 2)
            dl = tl.load(DSTAT + (j * B + b) * 2 + 1)
            qd = tl.exp(tl.load(DL + (j * B + b) * V + d).to(tl.float32) / temp - dm) / dl
            ratio = tl.where(qd > 0, pd / tl.maximum(qd, 1e-30), (pd > 0).to(tl.float32))
            ok = (tl.load(U + b * L + j) < ratio).to(tl.int32)
            alive = alive * ok
            n += alive
    tl.store(NACC + b, n)


@triton.jit
def _residual_chunks(TL, TSTAT, DL, DSTAT, NACC, NOISE, RPART, V, temp, L, N_CHUNKS,
                     BLOCK_V: tl.constexpr):
    """Program (b, c): at position n = NACC[b], over chunk c: the residual r = max(p_n - q_n, 0)
    (r = p_L where n = L), its mass, and the race winners of r / E and p_n / E:
    RPART (B, N_CHUNKS, 5) = mass, best r / E, its index, best p / E, its index."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    B = tl.num_programs(0)
    R = L + 1
    n = tl.load(NACC + b)
    offs = c * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    m = tl.load(TSTAT + (b * R + n) * 2)
    l_sum = tl.load(TSTAT + (b * R + n) * 2 + 1)
    x = tl.load(TL + (b * R + n) * V + offs, mask=ok, other=float("-inf")).to(tl.float32) / temp
    p = tl.exp(x - m) / l_sum
    nd = tl.minimum(n, L - 1)  # the draft's row at n (unused where n = L)
    dm = tl.load(DSTAT + (nd * B + b) * 2)
    dl = tl.load(DSTAT + (nd * B + b) * 2 + 1)
    y = tl.load(DL + (nd * B + b) * V + offs, mask=ok, other=float("-inf")).to(tl.float32) / temp
    q = tl.exp(y - dm) / dl
    r = tl.where(n < L, tl.maximum(p - q, 0.0), p)
    r = tl.where(ok, r, 0.0)
    e = tl.load(NOISE + b * V + offs, mask=ok, other=1.0)
    sr = tl.where(ok, r / e, -1.0)
    sp = tl.where(ok, p / e, -1.0)
    out = RPART + (b * N_CHUNKS + c) * 5
    tl.store(out, tl.sum(r, 0))
    tl.store(out + 1, tl.max(sr, 0))
    tl.store(out + 2, (c * BLOCK_V + tl.argmax(sr, 0)).to(tl.float32))
    tl.store(out + 3, tl.max(sp, 0))
    tl.store(out + 4, (c * BLOCK_V + tl.argmax(sp, 0)).to(tl.float32))


@triton.jit
def _race_winner(RPART, b, k, N_CHUNKS, CHUNKS_P2: tl.constexpr):
    """Index of the best score (field k, index in field k + 1) over the chunks, lowest on ties."""
    cs = tl.arange(0, CHUNKS_P2)
    c_ok = cs < N_CHUNKS
    part = RPART + (b * N_CHUNKS + cs) * 5
    s = tl.load(part + k, mask=c_ok, other=-2.0)
    top = tl.max(s, 0)
    first = tl.min(tl.where(s == top, cs, CHUNKS_P2), 0)
    return tl.sum(tl.where(cs == first, tl.load(part + k + 1, mask=c_ok, other=0.0), 0.0), 0).to(tl.int64)


@triton.jit
def _emit(TL, TSTAT, DRAFTS, NACC, RPART, TOKENS, LOGP, TLENS, DLENS, END, STATS, V, temp, L,
          stride_tok, stride_lp, N_CHUNKS, CHUNKS_P2: tl.constexpr):
    """Program b: the emitted token at n (the residual's winner where it has mass and n < L, else
    p_n's), tokens and the policy's log-probabilities of drafts 0..n-1 and of that token at slots
    lens + 1.. of the state, for unfinished rows (lens + 1 < end); lens += n + 1 there and the
    draft's lens follow; STATS += [unfinished, accepted, emitted]."""
    b = tl.program_id(0).to(tl.int64)
    R = L + 1
    n = tl.load(NACC + b)
    cs = tl.arange(0, CHUNKS_P2)
    mass = tl.sum(tl.load(RPART + (b * N_CHUNKS + cs) * 5, mask=cs < N_CHUNKS, other=0.0), 0)
    y_r = _race_winner(RPART, b, 1, N_CHUNKS, CHUNKS_P2)
    y_p = _race_winner(RPART, b, 3, N_CHUNKS, CHUNKS_P2)
    y = tl.where((n < L) & (mass > 1e-9), y_r, y_p)
    P = tl.load(TLENS + b)
    active = P + 1 < tl.load(END + b)
    if active:
        for j in range(R):
            if j <= n:
                tok = tl.where(j == n, y, tl.load(DRAFTS + b * L + tl.minimum(j, L - 1)))
                m = tl.load(TSTAT + (b * R + j) * 2)
                l_sum = tl.load(TSTAT + (b * R + j) * 2 + 1)
                x = tl.load(TL + (b * R + j) * V + tok).to(tl.float32) / temp
                tl.store(TOKENS + b * stride_tok + P + 1 + j, tok)
                tl.store(LOGP + b * stride_lp + P + 1 + j, x - m - tl.log(l_sum))
        tl.atomic_add(STATS, 1)
        tl.atomic_add(STATS + 1, n)
        tl.atomic_add(STATS + 2, n + 1)
    new_len = tl.where(active, P + n + 1, P)
    tl.store(TLENS + b, new_len)
    tl.store(DLENS + b, new_len)


def verify_select(tlogits: Tensor, dlogits: Tensor, dstat: Tensor, drafts: Tensor, u: Tensor,
                  noise: Tensor, temperature: float, tokens: Tensor, logp: Tensor, tlens: Tensor,
                  dlens: Tensor, end: Tensor, stats: Tensor, work: dict) -> None:
    """Standard speculative selection of one block per row, written to the generation state.

    Args:
        tlogits: (B, L + 1, V) the target's logits at x0 and the L drafted tokens (contiguous).
        dlogits: (L, B, V) the draft's logits of each drafted token; dstat (L, B, 2) their
            (max, sum of exp) of logits / T (``draft_merge``).
        drafts: (B, L) int64; u: (B, L) float32 uniforms; noise: (B, V) float32 Exp(1) draws.
        tokens, logp: (B, S) the generation state; tlens, dlens (B,) the target's and draft's
            cache lengths (slot of x0); end (B,); stats (3,) int64 accumulator
            [unfinished rows, accepted draft tokens, emitted tokens].
        work: workspaces from ``verify_workspace``.
    """
    B, R, V = tlogits.shape
    L = R - 1
    if dlogits.shape != (L, B, V) or drafts.shape != (B, L) or not tlogits.is_contiguous():
        raise ValueError(f"verify_select: tlogits (B, L+1, V) contiguous, dlogits (L, B, V), drafts (B, L); "
                         f"got {tuple(tlogits.shape)}, {tuple(dlogits.shape)}, {tuple(drafts.shape)}")
    if temperature <= 0:
        raise ValueError("verify_select needs temperature > 0 (greedy runs the torch path)")
    block = chunk_size()
    chunks = triton.cdiv(V, block)
    cp2 = max(triton.next_power_of_2(chunks), 2)
    temp = float(temperature)
    tpart, tstat, nacc, rpart = work["tpart"], work["tstat"], work["nacc"], work["rpart"]
    _target_chunks[(B, chunks)](tlogits, tpart, V, temp, R, chunks, BLOCK_V=block, num_warps=4)
    _accept[(B,)](tlogits, tpart, tstat, dlogits, dstat, drafts, u, nacc, V, temp, L, chunks,
                  CHUNKS_P2=cp2, num_warps=1)
    _residual_chunks[(B, chunks)](tlogits, tstat, dlogits, dstat, nacc, noise, rpart, V, temp, L,
                                  chunks, BLOCK_V=block, num_warps=4)
    _emit[(B,)](tlogits, tstat, drafts, nacc, rpart, tokens, logp, tlens, dlens, end, stats, V, temp,
                L, tokens.stride(0), logp.stride(0), chunks, CHUNKS_P2=cp2, num_warps=1)


def verify_workspace(B: int, L: int, V: int, device) -> dict:
    chunks = triton.cdiv(V, chunk_size())
    return {"tpart": torch.empty(B, L + 1, chunks, 2, device=device, dtype=torch.float32),
            "tstat": torch.empty(B, L + 1, 2, device=device, dtype=torch.float32),
            "nacc": torch.empty(B, device=device, dtype=torch.long),
            "rpart": torch.empty(B, chunks, 5, device=device, dtype=torch.float32)}
