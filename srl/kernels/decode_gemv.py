"""Small-batch matrix-vector kernels of a decode step with their neighbours fused in.

At batch 1 a decode step of the 124M policy spends its time in launches and in cuBLAS GEMVs
that reach a quarter of the memory bandwidth on 1-5 MB matrices, not in bytes. These kernels
read one weight tile per program in a single load (no K loop where K is the model width) and fold
the cheap row operations of the step into the matmul that consumes or produces them:

- ``gemv_norm``: y = LayerNorm(x_new) @ W^T, where x_new is either the embedding of the step's
  input token or x + (the sum of a float32 split-K partial, rounded as the torch matmul output
  would be). Every program recomputes the norm of its rows (a D-wide row is a few KB, read from
  L2); program 0 stores x_new into a second residual buffer (the callers alternate two buffers,
  so no program reads what another writes). Optional tanh-GELU epilogue (the MLP's fc).
- ``gemv_split``: float32 partials (SPLIT, B, N) of x @ W^T over K chunks, summed by the next
  ``gemv_norm`` (the output projection, the MLP's fc_out): more programs than output tiles, and
  no reduction launch.
- ``attend_proj``: rotary, cache write and attention of one head (``decode_step._attend_head``)
  times that head's columns of the output projection: per-head float32 partials, again summed by
  the next ``gemv_norm``; each output tile recomputes its head's attention (cheap at batch 1).
- ``head_sample``: the LM head with the final norm as its prologue and the first stage of
  ``srl.kernels.decode_step.sample_write`` (per-chunk max, sum of exp and exponential-race
  winner, online over the program's sub-tiles) as its epilogue; the logits are still written
  (the merge reads the winner's logit).
- ``norm_rows``: the final norm alone, for a cuBLAS head (``fused_decode.CUBLAS_HEAD``).

Rows (the batch) are looped inside each program over the weight tile held in registers, so the
path is for small batches; rounding follows the torch step (bf16 matmul outputs, residual sums
and norm outputs rounded to the activation dtype before use).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from srl.kernels.decode_step import INTERPRET, _attend_head, _sample_write, _store_chunk

PRO_PLAIN, PRO_RESIDUAL, PRO_EMBED = 0, 1, 2


@triton.jit
def _input_row(X_IN, PART, NPART, X_OUT, TOKENS, LENS, EMB, LNW, b, B, K, k0, eps, stride_tok,
               store, PRO: tl.constexpr, BLOCK_K: tl.constexpr):
    """Row b of the matmul's input over columns k0..k0+BLOCK_K, float32 (values of X_OUT's dtype).
    PRO 0: X_IN[b]; 1: LayerNorm(X_IN[b] + sum_s PART[s, b]) * LNW; 2: LayerNorm(EMB[token]) * LNW
    (1 and 2 need the whole row: k0 = 0, K <= BLOCK_K; x_new is stored to X_OUT where ``store``)."""
    ks = k0 + tl.arange(0, BLOCK_K)
    ok = ks < K
    if PRO == 0:
        a = tl.load(X_IN + b * K + ks, mask=ok, other=0.0).to(tl.float32)
    else:
        dt = X_OUT.dtype.element_ty
        if PRO == 1:
            y = tl.zeros([BLOCK_K], dtype=tl.float32)
            for s in range(NPART):
                y += tl.load(PART + (s * B + b) * K + ks, mask=ok, other=0.0)
            x = tl.load(X_IN + b * K + ks, mask=ok, other=0.0).to(tl.float32)
            x = (x + y.to(dt).to(tl.float32)).to(dt)
        else:
            pos = tl.load(LENS + b)
            tok = tl.load(TOKENS + b * stride_tok + pos).to(tl.int64)
            x = tl.load(EMB + tok * K + ks, mask=ok, other=0.0)
        tl.store(X_OUT + b * K + ks, x, mask=ok & (ks * 0 + store > 0))
        xf = x.to(tl.float32)
        mean = tl.sum(xf, 0) / K
        diff = tl.where(ok, xf - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 0) / K + eps)
        w = tl.load(LNW + ks, mask=ok, other=0.0).to(tl.float32)
        a = (diff * rstd * w).to(dt).to(tl.float32)
    return a


@triton.jit
def _gemv(X_IN, PART, NPART, X_OUT, TOKENS, LENS, EMB, LNW, W, Y, B, N, K, eps, stride_tok,
          PRO: tl.constexpr, EPI: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n tile, K chunk s). EPI 0: Y (B, N) rounded to Y's dtype; 1: tanh-GELU of that;
    2: Y (SPLIT, B, N) float32, the partial sum of chunk s."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    s = tl.program_id(1)
    ks = s * BLOCK_K + tl.arange(0, BLOCK_K)
    col_ok = cols < N
    w = tl.load(W + cols[:, None].to(tl.int64) * K + ks[None, :],
                mask=col_ok[:, None] & (ks < K)[None, :], other=0.0)
    store = (tl.program_id(0) + s == 0).to(tl.int32)  # one program writes x_new
    for b in range(B):
        a = _input_row(X_IN, PART, NPART, X_OUT, TOKENS, LENS, EMB, LNW, b, B, K, s * BLOCK_K, eps,
                       stride_tok, store, PRO, BLOCK_K)
        y = tl.sum(w.to(tl.float32) * a[None, :], 1)
        if EPI == 2:
            tl.store(Y + (s * B + b) * N + cols, y, mask=col_ok)
        else:
            y = y.to(Y.dtype.element_ty)
            if EPI == 1:  # as F.gelu(approximate="tanh") on the rounded matmul output
                yf = y.to(tl.float32)
                inner = 0.7978845608028654 * (yf + 0.044715 * yf * yf * yf)
                th = 2.0 / (1.0 + tl.exp(-2.0 * inner)) - 1.0
                y = (0.5 * yf * (1.0 + th)).to(Y.dtype.element_ty)
            tl.store(Y + b * N + cols, y, mask=col_ok)


@triton.jit
def _head_sample(X_IN, PART, NPART, LNW, W, LOGITS, NOISE, SPART, B, N, K, eps, temperature,
                 N_CHUNKS, SAMPLE: tl.constexpr, GREEDY: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, N_SUB: tl.constexpr):
    """Program c: logits of vocabulary rows [c * N_SUB * BLOCK_N, (c + 1) * N_SUB * BLOCK_N) for
    every row b, and (SAMPLE) the chunk's m_c, l_c, race winner and its index into SPART (B,
    N_CHUNKS, 4), as ``decode_step._sample_chunks`` computes them over the same chunk."""
    c = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    k_ok = ks < K
    for b in range(B):
        a = _input_row(X_IN, PART, NPART, LOGITS, LOGITS, LOGITS, LOGITS, LNW, b, B, K, 0, eps, 0,
                       0, 1, BLOCK_K)
        m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)
        l_sum = tl.zeros([BLOCK_N], dtype=tl.float32).sum(0)
        best = l_sum - 1.0  # race scores are >= 0; greedy scores are logits
        if GREEDY:
            best = m
        arg = l_sum + (c * N_SUB * BLOCK_N).to(tl.float32)
        for j in range(N_SUB):
            cols = (c * N_SUB + j) * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = cols < N
            w = tl.load(W + cols[:, None].to(tl.int64) * K + ks[None, :],
                        mask=ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.sum(w.to(tl.float32) * a[None, :], 1).to(LOGITS.dtype.element_ty)
            tl.store(LOGITS + b * N + cols, x, mask=ok)
            if SAMPLE:
                x = tl.where(ok, x.to(tl.float32), float("-inf"))
                if GREEDY:
                    r = x
                else:
                    x = x / temperature
                    m_new = tl.maximum(m, tl.max(x, 0))
                    alpha = tl.exp(m - m_new)
                    ex = tl.exp(x - m_new)
                    l_sum = l_sum * alpha + tl.sum(ex, 0)
                    e = tl.load(NOISE + b * N + cols, mask=ok, other=1.0)
                    r = tl.where(ok, ex / e, -1.0)
                    best = best * alpha
                    m = m_new
                top = tl.max(r, 0)
                better = top > best
                arg = tl.where(better, (j * BLOCK_N + c * N_SUB * BLOCK_N + tl.argmax(r, 0)).to(tl.float32), arg)
                best = tl.where(better, top, best)
        if SAMPLE:
            _store_chunk(SPART, b, c, N_CHUNKS, m, l_sum, best, arg)


@triton.jit
def _norm_rows(X_IN, PART, NPART, LNW, H, B, K, eps, BLOCK_K: tl.constexpr):
    """Program b: H[b] = LayerNorm(X_IN[b] + sum_s PART[s, b]) * LNW (``_input_row`` mode 1)."""
    b = tl.program_id(0)
    ks = tl.arange(0, BLOCK_K)
    a = _input_row(X_IN, PART, NPART, H, H, H, H, LNW, b, B, K, 0, eps, 0, 0, 1, BLOCK_K)
    tl.store(H + b * K + ks, a.to(H.dtype.element_ty), mask=ks < K)


@triton.jit
def _attend_proj(QKV, FREQS, LENS, KC, VC, W, PART, B, N, qk_scale, stride_qkv, stride_kb, stride_kh,
                 stride_ks, N_HEADS, HD: tl.constexpr, HD_P2: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_O: tl.constexpr):
    """Program (output tile t, head h): for every row b, the head's attention output
    (``decode_step._attend_head``; cache written by tile 0 only) rounded to the cache dtype, times
    the head's columns of the output projection: PART[h, b, tile] float32."""
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    cols = t * BLOCK_O + tl.arange(0, BLOCK_O)
    d = tl.arange(0, HD_P2)
    col_ok = cols < N
    w = tl.load(W + cols[:, None].to(tl.int64) * (N_HEADS * HD) + h * HD + d[None, :],
                mask=col_ok[:, None] & (d < HD)[None, :], other=0.0)
    for b in range(B):  # int32 offsets: attend_proj checks B * stride_kb < 2^31
        o = _attend_head(QKV, FREQS, LENS, KC, VC, b, h, (t == 0).to(tl.int32), qk_scale, stride_qkv,
                         stride_kb, stride_kh, stride_ks, N_HEADS, HD, HD_P2, BLOCK_S)
        o = o.to(KC.dtype.element_ty).to(tl.float32)
        tl.store(PART + (h * B + b) * N + cols, tl.sum(w.to(tl.float32) * o[None, :], 1), mask=col_ok)


TILES = {"norm": dict(BLOCK_N=16, num_warps=4), "split": dict(BLOCK_N=16, BLOCK_K=256, num_warps=4),
         "head": dict(BLOCK_N=16, N_SUB=8, num_warps=4), "attend": dict(BLOCK_O=256, BLOCK_S=128, num_warps=8)}
"""Tiles: ``norm`` for ``gemv_norm`` (BLOCK_K is the padded model width), ``split`` for
``gemv_split`` (BLOCK_K is the K chunk: SPLIT = K / BLOCK_K programs per output tile), ``head``
for ``head_sample`` (a program covers N_SUB * BLOCK_N vocabulary rows), ``attend`` for
``attend_proj`` (BLOCK_O output columns per program, each recomputing its head's attention over
cache tiles of BLOCK_S slots; default 8192 / head dim, at most 64). The H200 at batch 1 (124M
policy, 256 new tokens): BLOCK_S 128 with 8 warps 2,794 tok/s, 64 with 4 warps 2,519; the
norm and split tiles moved it by less than the run-to-run spread (2,450-2,545)."""
INTERPRET_TILES = {"norm": dict(BLOCK_N=32, num_warps=4), "split": dict(BLOCK_N=32, BLOCK_K=32, num_warps=4),
                   "head": dict(BLOCK_N=16, N_SUB=2, num_warps=4), "attend": dict(BLOCK_O=16, BLOCK_S=16, num_warps=4)}
"""Few programs through the interpreter (its cost is per program and op), still several K chunks
(MLP hidden > 32), output tiles, vocabulary chunks and sub-tiles at the tests' shapes."""
MAX_ROWS = 8
"""Largest batch of this path (rows are looped over a weight tile inside each program)."""


def _tiles(kind: str) -> dict:
    return dict((INTERPRET_TILES if INTERPRET else TILES)[kind])


def _check(x_rows: int, weight: Tensor, k: int, name: str) -> None:
    if x_rows > MAX_ROWS:
        raise ValueError(f"{name}: at most {MAX_ROWS} rows, got {x_rows}")
    if weight.dim() != 2 or weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"{name}: weight must be a contiguous (N, {k}) matrix, got {tuple(weight.shape)}")


def split_count(K: int) -> int:
    """Partials written by ``gemv_split`` over K (the first dim of its ``out``)."""
    return triton.cdiv(K, _tiles("split")["BLOCK_K"])


def gemv_split(x: Tensor, weight: Tensor, out: Tensor) -> None:
    """out (SPLIT, B, N) float32 = partial sums of x (B, K) @ weight (N, K)^T over K chunks."""
    B, K = x.shape
    N = weight.shape[0]
    _check(B, weight, K, "gemv_split")
    t = _tiles("split")
    if out.shape != (split_count(K), B, N) or out.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(f"gemv_split: out must be float32 {(split_count(K), B, N)}, got {tuple(out.shape)}")
    _gemv[(triton.cdiv(N, t["BLOCK_N"]), split_count(K))](
        x, x, 0, x, x, x, x, x, weight, out, B, N, K, 0.0, 0, PRO=PRO_PLAIN, EPI=2,
        BLOCK_N=t["BLOCK_N"], BLOCK_K=t["BLOCK_K"], num_warps=t["num_warps"])


def gemv_norm(weight: Tensor, norm_weight: Tensor, eps: float, x_out: Tensor, out: Tensor, *,
              x_in: Tensor | None = None, part: Tensor | None = None, tokens: Tensor | None = None,
              lens: Tensor | None = None, embedding: Tensor | None = None, gelu: bool = False) -> None:
    """out (B, N) = LayerNorm(x_new) * norm_weight @ weight^T (then tanh-GELU), x_new -> x_out (B, D).

    x_new = x_in + part.sum(0) rounded to x_in's dtype (``part`` from ``gemv_split``), or, with
    ``tokens``/``lens``/``embedding``, embedding[tokens[b, lens[b]]]. x_out must not be x_in."""
    B, D = x_out.shape
    _check(B, weight, D, "gemv_norm")
    t = _tiles("norm")
    block_k = triton.next_power_of_2(D)
    common = dict(BLOCK_N=t["BLOCK_N"], BLOCK_K=block_k, EPI=1 if gelu else 0, num_warps=t["num_warps"])
    grid = (triton.cdiv(weight.shape[0], t["BLOCK_N"]), 1)
    if embedding is not None:
        _gemv[grid](x_out, x_out, 0, x_out, tokens, lens, embedding, norm_weight, weight, out, B,
                    weight.shape[0], D, float(eps), tokens.stride(0), PRO=PRO_EMBED, **common)
        return
    if x_in is None or part is None or x_in.data_ptr() == x_out.data_ptr():
        raise ValueError("gemv_norm: give x_in and part (x_in distinct from x_out), or the embedding")
    _gemv[grid](x_in, part, part.shape[0], x_out, x_out, x_out, x_out, norm_weight, weight, out, B,
                weight.shape[0], D, float(eps), 0, PRO=PRO_RESIDUAL, **common)


def head_chunks(V: int) -> int:
    t = _tiles("head")
    return triton.cdiv(V, t["BLOCK_N"] * t["N_SUB"])


def head_sample(x_in: Tensor, part: Tensor, norm_weight: Tensor, eps: float, weight: Tensor,
                logits: Tensor, noise: Tensor | None, spart: Tensor | None, temperature: float,
                tokens: Tensor | None = None, logp: Tensor | None = None, lens: Tensor | None = None,
                end: Tensor | None = None, merge: bool = True) -> None:
    """logits (B, V) = LayerNorm(x_in + part.sum(0)) * norm_weight @ weight^T; with ``noise``
    (B, V) Exp(1) draws, the token drawn from softmax(logits / T) (the race of
    ``decode_step.sample_write``, same arguments) and its log-probability are written to
    tokens/logp at lens + 1 with lens advanced for unfinished rows. ``spart``: (B, head_chunks(V),
    4) float32 workspace. ``merge`` False: only the race's chunk stage into ``spart`` (the caller
    merges, e.g. ``spec_select.draft_merge``)."""
    B, D = x_in.shape
    V = weight.shape[0]
    _check(B, weight, D, "head_sample")
    t = _tiles("head")
    chunks = head_chunks(V)
    sample = noise is not None
    greedy = temperature == 0
    temp = float(temperature) or 1.0
    _head_sample[(chunks,)](x_in, part, part.shape[0], norm_weight, weight, logits, noise if sample else logits,
                            spart if sample else logits, B, V, D, float(eps), temp, chunks, SAMPLE=sample,
                            GREEDY=greedy, BLOCK_N=t["BLOCK_N"], BLOCK_K=triton.next_power_of_2(D),
                            N_SUB=t["N_SUB"], num_warps=t["num_warps"])
    if sample and merge:
        _sample_write[(B,)](logits, spart, tokens, logp, lens, end, temp, logits.stride(0),
                            tokens.stride(0), logp.stride(0), chunks, GREEDY=greedy,
                            CHUNKS_P2=max(triton.next_power_of_2(chunks), 2), num_warps=4)


def norm_rows(x_in: Tensor, part: Tensor, norm_weight: Tensor, eps: float, h: Tensor) -> None:
    """h (B, D) = LayerNorm(x_in + part.sum(0)) * norm_weight, the sum rounded to x_in's dtype
    (the final norm before the head)."""
    B, D = x_in.shape
    if h.shape != (B, D) or part.shape[1:] != (B, D) or not (x_in.is_contiguous() and h.is_contiguous()):
        raise ValueError(f"norm_rows: x_in and h (B, D) contiguous, part (S, B, D); got {tuple(h.shape)}, "
                         f"{tuple(part.shape)}")
    _norm_rows[(B,)](x_in, part, part.shape[0], norm_weight, h, B, D, float(eps),
                     BLOCK_K=triton.next_power_of_2(D), num_warps=4)


def attend_proj(qkv: Tensor, freqs: Tensor, lens: Tensor, k_cache: Tensor, v_cache: Tensor,
                weight: Tensor, part: Tensor, n_heads: int) -> None:
    """``decode_step.rope_attend`` (same arguments, cache written) and the output projection
    ``weight`` (D, H * HD) as per-head float32 partials: part (H, B, D), summed by ``gemv_norm``."""
    B = qkv.shape[0]
    hd = k_cache.shape[-1]
    D = weight.shape[0]
    _check(B, weight, n_heads * hd, "attend_proj")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or qkv.stride(-1) != 1:
        raise ValueError("attend_proj needs k and v caches with equal strides and contiguous rows")
    if part.shape != (n_heads, B, D) or part.dtype != torch.float32:
        raise ValueError(f"attend_proj: part must be float32 {(n_heads, B, D)}, got {tuple(part.shape)}")
    if B * k_cache.stride(0) >= 2**31:
        raise ValueError("attend_proj: the cache is too large for int32 row offsets")
    t = _tiles("attend")
    _attend_proj[(triton.cdiv(D, t["BLOCK_O"]), n_heads)](
        qkv, freqs, lens, k_cache, v_cache, weight, part, B, D, float(hd ** -0.5) * 1.4426950408889634,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), n_heads, HD=hd,
        HD_P2=max(triton.next_power_of_2(hd), 2), BLOCK_S=t.get("BLOCK_S", max(16, min(64, 8192 // hd))),
        BLOCK_O=t["BLOCK_O"], num_warps=t["num_warps"])
