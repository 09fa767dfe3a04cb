"""Fused kernels of one language-model decode step (one new token per row, batch B).

A decode step of ``TransformerLM`` in plain torch is about fifteen launches per layer besides the
matmuls (layer norms, the residual adds, rotary in complex float32 and back, two cache scatters,
the attention mask, transposes and copies around SDPA), and another dozen for sampling and the
bookkeeping of the generation state. At batch 1 every one of them costs a launch slot of a few
microseconds inside a CUDA graph, far more than the bytes it moves. These kernels do the same
arithmetic in four kinds of launch (``srl.generation.fused_decode`` strings them together):

- ``residual_norm``: x += branch (rounded to x's dtype, as the torch add is), h = LayerNorm(x) * w;
  or, for the first layer, x = embedding[tokens[b, lens[b]]] (the step's input token) and h.
- ``rope_attend``: rotary on q and k of the fused qkv projection at position lens[b], k and v
  written to the cache at slot lens[b], and attention of q over slots 0..lens[b] (the new token's
  own key taken from registers), written as (B, H * D) for the output projection.
- ``sample_write`` (two launches: chunks of the vocabulary, then one program per row):
  softmax(logits / T), the exponential race against the given Exp(1) noise
  (``srl.generation.sampling.sample_from_probs``), log p of the drawn token, and the write of token
  and log-probability to slot lens[b] + 1 with lens[b] advanced for unfinished rows.

Shapes: B rows, D model width, H heads, HD head dim, S cache slots, V vocabulary.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# --------------------------------------------------------------------------- residual + norm

@triton.jit
def _residual_norm(X, Y, W, H, TOKENS, LENS, EMB, COUNT, stride_tok, D, eps,
                   MODE: tl.constexpr, BLOCK_D: tl.constexpr):
    """MODE 0: x = EMB[TOKENS[b, LENS[b]]]; 1: x += Y; 2: x += Y (float32 workspace, rounded to
    x's dtype first, then zeroed, and the int32 COUNT zeroed). Stores x, and h = LayerNorm(x) * W
    (no bias) into H."""
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    ok = offs < D
    if MODE == 0:
        pos = tl.load(LENS + b)
        tok = tl.load(TOKENS + b * stride_tok + pos).to(tl.int64)
        x = tl.load(EMB + tok * D + offs, mask=ok, other=0.0)
    else:
        x = tl.load(X + b * D + offs, mask=ok, other=0.0)
        y = tl.load(Y + b * D + offs, mask=ok, other=0.0)
        if MODE == 2:
            tl.store(Y + b * D + offs, tl.zeros_like(y), mask=ok)
            if b == 0:
                tl.store(COUNT, 0)
        y = y.to(X.dtype.element_ty)
        x = (x.to(tl.float32) + y.to(tl.float32)).to(X.dtype.element_ty)
    tl.store(X + b * D + offs, x, mask=ok)
    xf = x.to(tl.float32)
    mean = tl.sum(xf, 0) / D
    diff = tl.where(ok, xf - mean, 0.0)
    var = tl.sum(diff * diff, 0) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    w = tl.load(W + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(H + b * D + offs, (diff * rstd * w).to(H.dtype.element_ty), mask=ok)


def _norm_warps(D: int) -> int:
    return 4 if D <= 1024 else (8 if D <= 4096 else 16)


def residual_norm(x: Tensor, branch: Tensor, weight: Tensor, eps: float, h: Tensor,
                  counter: Tensor | None = None) -> None:
    """In place: x (B, D) += branch (B, D), then h = layer_norm(x) * weight.

    With ``counter`` (int32, one element), ``branch`` is a float32 accumulator that is rounded to
    x's dtype before the add, and both are zeroed behind the read (the CATS decode workspace,
    ``srl.kernels.cats.cats_mlp_partial``)."""
    B, D = x.shape
    mode = 1 if counter is None else 2
    _residual_norm[(B,)](x, branch, weight, h, x, x, x, x if counter is None else counter, 0, D,
                         float(eps), MODE=mode,
                         BLOCK_D=triton.next_power_of_2(D), num_warps=_norm_warps(D))


def embed_norm(tokens: Tensor, lens: Tensor, embedding: Tensor, weight: Tensor, eps: float,
               x: Tensor, h: Tensor) -> None:
    """x (B, D) = embedding[tokens[b, lens[b]]] and h = layer_norm(x) * weight."""
    B, D = x.shape
    _residual_norm[(B,)](x, x, weight, h, tokens, lens, embedding, x, tokens.stride(0), D, float(eps),
                         MODE=0, BLOCK_D=triton.next_power_of_2(D), num_warps=_norm_warps(D))


# --------------------------------------------------------------------------- rotary + cache + attention

@triton.jit
def _rope_attend(QKV, FREQS, LENS, KC, VC, O, qk_scale, stride_qkv, stride_kb, stride_kh, stride_ks,
                 stride_ob, N_HEADS, HD: tl.constexpr, HD_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (row b, head h): ``_attend_head``, stored to O[b, h * HD:(h + 1) * HD]."""
    pid = tl.program_id(0)
    b = (pid // N_HEADS).to(tl.int64)
    h = (pid % N_HEADS).to(tl.int64)
    d = tl.arange(0, HD_P2)
    o = _attend_head(QKV, FREQS, LENS, KC, VC, b, h, 1, qk_scale, stride_qkv, stride_kb, stride_kh,
                     stride_ks, N_HEADS, HD, HD_P2, BLOCK_N)
    tl.store(O + b * stride_ob + h * HD + d, o.to(O.dtype.element_ty), mask=d < HD)


@triton.jit
def _attend_head(QKV, FREQS, LENS, KC, VC, b, h, write, qk_scale, stride_qkv, stride_kb, stride_kh,
                 stride_ks, N_HEADS, HD: tl.constexpr, HD_P2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Attention output (HD_P2,) float32 of row b, head h; k and v written to the cache where
    ``write`` != 0. Rotary pairs (2i, 2i+1): out[d] = x[d] cos - x[d+1] sin for even d and
    x[d] cos + x[d-1] sin for odd d, with the pair's partner read as x[d ^ 1], so every tile is a
    contiguous row of the head dim (cached keys are stored rotated)."""
    d = tl.arange(0, HD_P2)
    d_ok = d < HD
    width = N_HEADS * HD
    base = QKV + b * stride_qkv + h * HD
    # loads that do not need the position first, so they are in flight together
    q = tl.load(base + d, mask=d_ok, other=0.0).to(tl.float32)
    q_p = tl.load(base + (d ^ 1), mask=d_ok, other=0.0).to(tl.float32)
    k = tl.load(base + width + d, mask=d_ok, other=0.0).to(tl.float32)
    k_p = tl.load(base + width + (d ^ 1), mask=d_ok, other=0.0).to(tl.float32)
    v = tl.load(base + 2 * width + d, mask=d_ok, other=0.0)
    n = tl.load(LENS + b).to(tl.int32)  # slot and rotary position of the new token
    half = d // 2
    c = tl.load(FREQS + n * HD + 2 * half, mask=d_ok, other=0.0)
    s = tl.load(FREQS + n * HD + 2 * half + 1, mask=d_ok, other=0.0)
    sign = tl.where(d % 2 == 0, -1.0, 1.0)
    dt = KC.dtype.element_ty
    # rotated and rounded to the cache dtype, as the torch path does before attention
    q = (q * c + sign * q_p * s).to(dt).to(tl.float32)
    k = (k * c + sign * k_p * s).to(dt)
    v = v.to(dt)
    kv_off = b * stride_kb + h * stride_kh
    w_ok = d_ok & (d * 0 + write != 0)
    tl.store(KC + kv_off + n * stride_ks + d, k, mask=w_ok)
    tl.store(VC + kv_off + n * stride_ks + d, v, mask=w_ok)
    # the new token's own key first, then the cached slots 0..n-1 (online softmax, base 2)
    m = tl.sum(q * k.to(tl.float32), 0) * qk_scale
    l_sum = m * 0.0 + 1.0
    acc = v.to(tl.float32)
    js0 = tl.arange(0, BLOCK_N)
    for start in range(0, n, BLOCK_N):
        js = start + js0
        j_ok = js < n
        ptr = kv_off + js[:, None].to(tl.int64) * stride_ks + d[None, :]
        tile_ok = j_ok[:, None] & d_ok[None, :]
        kt = tl.load(KC + ptr, mask=tile_ok, other=0.0)
        vt = tl.load(VC + ptr, mask=tile_ok, other=0.0)
        sc = tl.sum(kt.to(tl.float32) * q[None, :], 1) * qk_scale
        sc = tl.where(j_ok, sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 0))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(sc - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * vt.to(tl.float32), 0)
        m = m_new
    return acc / l_sum


def rope_attend(qkv: Tensor, freqs: Tensor, lens: Tensor, k_cache: Tensor, v_cache: Tensor,
                out: Tensor, n_heads: int) -> None:
    """Rotary, cache write and decode attention of one new token per row.

    Args:
        qkv: (B, 3 * H * HD), the fused projection laid out as (3, H, HD) per row.
        freqs: (max positions, HD / 2, 2) float32, cos and sin (``view_as_real`` of the model's table).
        lens: (B,) int64, the slot and position of each row's new token.
        k_cache, v_cache: (B, H, S, HD) one layer's cache (last dim contiguous, same strides).
        out: (B, H * HD) attention output, heads side by side (the output projection's input).
    """
    B = qkv.shape[0]
    hd = k_cache.shape[-1]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or qkv.stride(-1) != 1:
        raise ValueError("rope_attend needs k and v caches with equal strides and contiguous rows")
    if hd % 2:
        raise ValueError(f"rotary needs an even head dim, got {hd}")
    block_n = 16 if INTERPRET else max(16, min(64, 8192 // hd))
    _rope_attend[(B * n_heads,)](
        qkv, freqs, lens, k_cache, v_cache, out, float(hd ** -0.5) * 1.4426950408889634,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0),
        n_heads, HD=hd, HD_P2=max(triton.next_power_of_2(hd), 2), BLOCK_N=block_n,
        num_warps=4 if hd <= 64 else 8)


# --------------------------------------------------------------------------- sampling + state write

@triton.jit
def _sample_chunks(LOGITS, NOISE, PART, V, temperature, stride_l, stride_n, N_CHUNKS,
                   GREEDY: tl.constexpr, BLOCK_V: tl.constexpr):
    """Program (b, c) over BLOCK_V logits: the chunk's max m_c and sum of exp(x / T - m_c), and
    its best candidate: argmax of exp(x / T - m_c) / E (greedy: of x), first index on ties.
    PART (B, N_CHUNKS, 4) float32: m_c, l_c, best score, best index."""
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    offs = c * BLOCK_V + tl.arange(0, BLOCK_V)
    ok = offs < V
    x = tl.load(LOGITS + b * stride_l + offs, mask=ok, other=float("-inf")).to(tl.float32)
    if GREEDY:
        m = tl.max(x, 0)
        l_sum = m * 0.0
        r = x
    else:
        x = x / temperature
        m = tl.max(x, 0)
        ex = tl.exp(x - m)
        l_sum = tl.sum(ex, 0)
        e = tl.load(NOISE + b * stride_n + offs, mask=ok, other=1.0)
        r = tl.where(ok, ex / e, -1.0)
    best = tl.max(r, 0)
    arg = (c * BLOCK_V + tl.argmax(r, 0)).to(tl.float32)  # exact below 2^24
    _store_chunk(PART, b, c, N_CHUNKS, m, l_sum, best, arg)


@triton.jit
def _store_chunk(PART, b, c, N_CHUNKS, m, l_sum, best, arg):
    """One chunk's (m_c, l_c, best score, best index) into PART (B, N_CHUNKS, 4)."""
    out = PART + (b * N_CHUNKS + c) * 4
    tl.store(out, m)
    tl.store(out + 1, l_sum)
    tl.store(out + 2, best)
    tl.store(out + 3, arg)


@triton.jit
def merge_race(PART, b, N_CHUNKS, GREEDY: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """Finish row b's exponential race from its chunk records (max, sum of exp, best score,
    argmax) in PART (B, N_CHUNKS, 4), each chunk's scores rescaled by exp(m_c - m): the winner
    y, the row's max m and sum of exp l_sum of logits / T (l_sum 0 under GREEDY), and the top score."""
    cs = tl.arange(0, CHUNKS_P2)
    c_ok = cs < N_CHUNKS
    part = PART + (b * N_CHUNKS + cs) * 4
    m_c = tl.load(part, mask=c_ok, other=float("-inf"))
    best_c = tl.load(part + 2, mask=c_ok, other=float("-inf"))
    arg_c = tl.load(part + 3, mask=c_ok, other=0.0)
    m = tl.max(m_c, 0)
    if GREEDY:
        score = best_c
        l_sum = m * 0.0
    else:
        scale = tl.where(c_ok, tl.exp(m_c - m), 0.0)
        l_sum = tl.sum(tl.load(part + 1, mask=c_ok, other=0.0) * scale, 0)
        score = tl.where(c_ok, best_c * scale, -1.0)
    top = tl.max(score, 0)
    first = tl.min(tl.where(score == top, cs, CHUNKS_P2), 0)  # the lowest chunk on ties
    y = tl.sum(tl.where(cs == first, arg_c, 0.0), 0).to(tl.int64)
    return y, m, l_sum, top


@triton.jit
def _sample_write(LOGITS, PART, TOKENS, LOGP, LENS, END, temperature, stride_l, stride_tok,
                  stride_lp, N_CHUNKS, GREEDY: tl.constexpr, CHUNKS_P2: tl.constexpr):
    """Program b: merge the chunks (p / E compared on one scale), write token and log p."""
    b = tl.program_id(0).to(tl.int64)
    y, m, l_sum, top = merge_race(PART, b, N_CHUNKS, GREEDY, CHUNKS_P2)
    if GREEDY:
        logp = top * 0.0
    else:
        x_y = tl.load(LOGITS + b * stride_l + y).to(tl.float32) / temperature
        logp = tl.log(tl.exp(x_y - m) / l_sum)
    n = tl.load(LENS + b)
    if n + 1 < tl.load(END + b):
        tl.store(TOKENS + b * stride_tok + n + 1, y)
        tl.store(LOGP + b * stride_lp + n + 1, logp)
        tl.store(LENS + b, n + 1)


SAMPLE_BLOCK = 2048
"""Logits per program of the first sampling stage (50304 / 2048 = 25 programs per row)."""


def sample_write(logits: Tensor, noise: Tensor, tokens: Tensor, logp: Tensor, lens: Tensor,
                 end: Tensor, temperature: float, part: Tensor | None = None) -> None:
    """Sample a token per row of ``logits`` (B, V) and write it to the generation state.

    ``noise`` (B, V) float32 holds Exp(1) draws (``sample_from_probs`` draws the same ones from
    the same generator); temperature 0 is greedy. Row b's token and its log-probability under
    the sampled distribution go to slot lens[b] + 1 of ``tokens`` / ``logp`` (B, S), and lens[b]
    advances, only while lens[b] + 1 < end[b] (``GenState.write`` and ``lens.add_(active)``).
    The race argmax_x p(x) / E_x runs in two stages: per chunk of the vocabulary, then over the
    chunks, with each chunk's scores rescaled by exp(m_c - m). ``part``: a (B, chunks, 4)
    float32 workspace (allocated when not given; ``sample_workspace``)."""
    B, V = logits.shape
    block = 64 if INTERPRET else SAMPLE_BLOCK
    chunks = triton.cdiv(V, block)
    if part is None:
        part = sample_workspace(B, V, logits.device)
    greedy = temperature == 0
    temp = float(temperature) or 1.0
    _sample_chunks[(B, chunks)](logits, noise, part, V, temp, logits.stride(0), noise.stride(0),
                                chunks, GREEDY=greedy, BLOCK_V=block, num_warps=4)
    _sample_write[(B,)](logits, part, tokens, logp, lens, end, temp, logits.stride(0),
                        tokens.stride(0), logp.stride(0), chunks, GREEDY=greedy,
                        CHUNKS_P2=max(triton.next_power_of_2(chunks), 2), num_warps=1)


def sample_chunks(logits: Tensor, noise: Tensor, part: Tensor, temperature: float) -> None:
    """The first stage of ``sample_write`` alone (temperature > 0): per chunk of the vocabulary
    the max, sum of exp and race winner of softmax(logits / T) against ``noise`` into ``part``
    (``sample_workspace``); ``spec_select.draft_merge`` finishes it for a draft token."""
    B, V = logits.shape
    block = 64 if INTERPRET else SAMPLE_BLOCK
    chunks = triton.cdiv(V, block)
    if part.shape != (B, chunks, 4) or temperature <= 0:
        raise ValueError(f"sample_chunks: part must be {(B, chunks, 4)} and temperature > 0, got "
                         f"{tuple(part.shape)}, {temperature}")
    _sample_chunks[(B, chunks)](logits, noise, part, V, float(temperature), logits.stride(0),
                                noise.stride(0), chunks, GREEDY=False, BLOCK_V=block, num_warps=4)


def sample_workspace(B: int, V: int, device) -> Tensor:
    block = 64 if INTERPRET else SAMPLE_BLOCK
    return torch.empty(B, triton.cdiv(V, block), 4, device=device, dtype=torch.float32)


# --------------------------------------------------------------------------- T tokens of one row

@triton.jit
def _rope_attend_rows(QKV, FREQS, LENS, KC, VC, O, qk_scale, T, stride_qkv, stride_kb, stride_kh,
                      stride_ks, stride_o, N_HEADS, HD: tl.constexpr, HD_P2: tl.constexpr,
                      T_P2: tl.constexpr, BLOCK_N: tl.constexpr, LOWP: tl.constexpr):
    """Program (row b, head h): the T query rows b * T + i (i < T) at slot and position
    LENS[b] + i. Rotary on their q and k (as ``_attend_head``), k and v written to the cache,
    then attention of row i over the cached slots < LENS[b] and the new keys 0..i, those taken
    from registers (no program reads a slot another program of the launch writes). LOWP: both
    matmuls on the tensor cores in the cache dtype (q and k are rounded to it anyway; the
    probabilities are rounded to it in either mode)."""
    pid = tl.program_id(0)
    b = (pid // N_HEADS).to(tl.int64)
    h = (pid % N_HEADS).to(tl.int64)
    i = tl.arange(0, T_P2)
    d = tl.arange(0, HD_P2)
    ok = (i < T)[:, None] & (d < HD)[None, :]
    width = N_HEADS * HD
    rows = b * T + i.to(tl.int64)
    base = QKV + rows[:, None] * stride_qkv + h * HD
    q = tl.load(base + d[None, :], mask=ok, other=0.0).to(tl.float32)
    q_p = tl.load(base + (d ^ 1)[None, :], mask=ok, other=0.0).to(tl.float32)
    k = tl.load(base + width + d[None, :], mask=ok, other=0.0).to(tl.float32)
    k_p = tl.load(base + width + (d ^ 1)[None, :], mask=ok, other=0.0).to(tl.float32)
    v = tl.load(base + 2 * width + d[None, :], mask=ok, other=0.0)
    P = tl.load(LENS + b).to(tl.int32)
    n = P + i  # slot and rotary position of each new token
    fb = FREQS + n[:, None] * HD + 2 * (d // 2)[None, :]
    c = tl.load(fb, mask=ok, other=0.0)
    s = tl.load(fb + 1, mask=ok, other=0.0)
    sign = tl.where(d % 2 == 0, -1.0, 1.0)[None, :]
    dt = KC.dtype.element_ty
    q = (q * c + sign * q_p * s).to(dt)
    k = (k * c + sign * k_p * s).to(dt)
    v = v.to(dt)
    kv_off = b * stride_kb + h * stride_kh
    ptr = kv_off + n[:, None].to(tl.int64) * stride_ks + d[None, :]
    tl.store(KC + ptr, k, mask=ok)
    tl.store(VC + ptr, v, mask=ok)
    # the new tokens among themselves (causal), then the cached slots 0..P-1 (online softmax, base 2)
    sc = _dot(q, tl.trans(k), LOWP) * qk_scale
    sc = tl.where((i[None, :] <= i[:, None]) & (i < T)[None, :], sc, float("-inf"))
    m = tl.max(sc, 1)
    p = tl.exp2(sc - m[:, None])
    l_sum = tl.sum(p, 1)
    acc = _dot(p.to(dt), v, LOWP)
    js0 = tl.arange(0, BLOCK_N)
    for start in range(0, P, BLOCK_N):
        js = start + js0
        j_ok = js < P
        tptr = kv_off + js[:, None].to(tl.int64) * stride_ks + d[None, :]
        tile_ok = j_ok[:, None] & (d < HD)[None, :]
        kt = tl.load(KC + tptr, mask=tile_ok, other=0.0)
        vt = tl.load(VC + tptr, mask=tile_ok, other=0.0)
        st = _dot(q, tl.trans(kt), LOWP) * qk_scale
        st = tl.where(j_ok[None, :], st, float("-inf"))
        m_new = tl.maximum(m, tl.max(st, 1))
        alpha = tl.exp2(m - m_new)
        pt = tl.exp2(st - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(pt, 1)
        acc = acc * alpha[:, None] + _dot(pt.to(dt), vt, LOWP)
        m = m_new
    o = acc / l_sum[:, None]
    tl.store(O + rows[:, None] * stride_o + h * HD + d[None, :], o.to(O.dtype.element_ty), mask=ok)


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    """a @ b with float32 accumulation: on the tensor cores in the inputs' dtype (LOWP), else in
    exact float32 ("ieee": no TF32 rounding)."""
    if LOWP:
        return tl.dot(a, b, out_dtype=tl.float32)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")


def rope_attend_rows(qkv: Tensor, freqs: Tensor, lens: Tensor, k_cache: Tensor, v_cache: Tensor,
                     out: Tensor, n_heads: int, T: int) -> None:
    """``rope_attend`` for T consecutive new tokens per row (a chunk: the verification pass of
    standard speculative sampling, a short re-feed): qkv and out are (B * T, ...) with row
    b * T + i the token at slot and position lens[b] + i, which attends to the slots < lens[b]
    and to the chunk's tokens 0..i. Same arguments as ``rope_attend`` otherwise."""
    R = qkv.shape[0]
    hd = k_cache.shape[-1]
    B = lens.shape[0]
    if R != B * T or out.shape[0] != R:
        raise ValueError(f"rope_attend_rows: qkv and out need lens.shape[0] * T = {B * T} rows, got {R}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or qkv.stride(-1) != 1:
        raise ValueError("rope_attend_rows needs k and v caches with equal strides and contiguous rows")
    if hd % 2:
        raise ValueError(f"rotary needs an even head dim, got {hd}")
    lowp = not INTERPRET and k_cache.dtype in (torch.float16, torch.bfloat16)
    _rope_attend_rows[(B * n_heads,)](
        qkv, freqs, lens, k_cache, v_cache, out, float(hd ** -0.5) * 1.4426950408889634, T,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), n_heads,
        HD=hd, HD_P2=max(triton.next_power_of_2(hd), 16), T_P2=max(triton.next_power_of_2(T), 16),
        BLOCK_N=16 if INTERPRET else 64, LOWP=lowp, num_warps=4)
