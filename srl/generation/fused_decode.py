"""One decode step of a ``TransformerLM`` in few launches (``srl.kernels.decode_step``).

``FusedDecodeStep`` computes what ``srl.generation.decode.decode_one_token`` computes (the same
model function, the same draws from the same generator, the same writes to the generation state
and the cache) for the common case: standard residual wiring, dense attention, one process. Per
layer it launches the qkv matmul, one rotary + cache write + attention kernel, the output
projection, a residual + norm kernel, the MLP (dense torch, or CATS's sparse kernel), and a
second residual + norm; per step one embedding + norm kernel, the head matmul, the Exp(1) noise
and one sampling + state-write kernel. The plain torch step launches about three times as many
kernels, and at small batch the launches, not the bytes, set the time of a graphed step.

With CATS the MLP's float32 accumulator is added to the residual by the next norm kernel, which
zeroes it behind itself, so the CATS path needs no separate cast launch (``fused_cats_mlp``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def fused_unsupported(model, params) -> str | None:
    """Why ``FusedDecodeStep`` cannot run ``model`` (None: it can)."""
    from srl.policies.lm import no_reduce

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "blocks") or not hasattr(model, "rotary"):
        return "not a TransformerLM"
    if cfg.residual != "standard":
        return f"residual {cfg.residual!r}"
    if getattr(model, "local_heads", cfg.n_heads) != cfg.n_heads:
        return "tensor-parallel shard"
    for b in model.blocks:
        if b.pattern is not None:
            return "sparse attention pattern"
        if b.reduce is not no_reduce:
            return "cross-rank reduction"
        if b.norm1.bias is not None or b.norm2.bias is not None or b.qkv.bias is not None:
            return "biased norm or projection"
    if model.norm.bias is not None or model.head.bias is not None:
        return "biased final norm or head"
    return None


def fused_cats_mlp(gated, h: Tensor) -> tuple[Tensor, Tensor] | None:
    """CATS decode kernel without its final cast: (float32 accumulator (B, D), int32 counter),
    which the next ``residual_norm(..., counter=...)`` reads and zeroes; None when not applicable."""
    from srl.kernels import cats

    if gated is None or gated.cats_threshold is None or h.shape[0] > cats.KERNEL_MAX_BATCH:
        return None
    if not (h.is_cuda or cats.INTERPRET) or (torch.is_grad_enabled() and h.requires_grad):
        return None
    return cats.cats_mlp_partial(h, gated.gate.weight, gated.up.weight, gated.down.weight,
                                 gated.cats_threshold, CATS_DOWN_CONFIG)


CATS_DOWN_CONFIG = dict(BLOCK_N=256, BLOCK_K=32, SPLIT=32, num_warps=4, num_stages=3)
"""Tiles of the CATS down kernel inside the fused step: the best of three candidates timed in the
model on the H200 (4 layers, d_model 4096, batch 1: 1,786 tok/s against 1,746 with the tiles that
won when the MLP was timed alone, ``srl.kernels.cats.DOWN_CONFIG``; docs/benchmarks.md)."""


FUSED_GEMV = 1
"""Largest batch that takes the small-batch path (0: never), for GELU-MLP models of width <= 1024
(``srl.kernels.decode_gemv``): per layer, qkv with the norm (and the residual add, or the
embedding) as its prologue; rotary + attention + the output projection as per-head partials (or,
without ``ATTEND_PROJ``, rotary + attention, then the projection as split-K partials); fc with
the next norm as prologue and GELU as epilogue; fc_out as split-K partials. Then the head with
the final norm and the first sampling stage fused, and the sampling merge. Measured on the H200
at batch 1: 2,794 tok/s against 2,034 for the cuBLAS fused step; at batch 4 it lost (5,507
against 7,902: the rows are looped inside each program), hence 1."""
ATTEND_PROJ = True
"""With the small-batch path: rotary + attention and the output projection in one launch
(``decode_gemv.attend_proj``; four launches per layer)."""
CUBLAS_HEAD = False
"""With the small-batch path: the final norm as one kernel and the head through cuBLAS, then the
two sampling kernels, instead of ``decode_gemv.head_sample`` (the head with the final norm and the
first sampling stage fused). Not yet timed end to end: in the H200 kernel trace at batch 1 the
Triton head took 42.9 us and cuBLAS's 20.8 (plus about 6 us for the norm, the first sampling
stage and two more launches), so it should save ~14 us per token."""


class FusedDecodeStep:
    """Callable ``step(generator)``: one token per unfinished row, written to ``state``."""

    def __init__(self, model, cache, state, params, fuse_cats_cast: bool = True, gemv: bool | None = None):
        why = fused_unsupported(model, params)
        if why is not None:
            raise ValueError(f"fused decode step cannot run this model: {why}")
        self.model, self.cache, self.state, self.params = model, cache, state, params
        self.fuse_cats_cast = fuse_cats_cast
        from srl.kernels.decode_step import sample_workspace

        cfg = model.config
        B, dev = state.tokens.shape[0], state.tokens.device
        dtype = model.embed.weight.dtype
        self.x = torch.zeros(B, cfg.d_model, device=dev, dtype=dtype)
        self.h = torch.zeros_like(self.x)
        self.attn = torch.zeros_like(self.x)
        self.noise = torch.zeros(B, cfg.vocab_size, device=dev, dtype=torch.float32)
        self.part = sample_workspace(B, cfg.vocab_size, dev)
        self.freqs = torch.view_as_real(model.rotary.freqs).contiguous()  # (P, HD/2, 2) float32
        self.torch_sampling = params.top_k is not None or (params.top_p is not None and params.top_p < 1.0)
        use = B <= FUSED_GEMV if gemv is None else gemv
        self.gemv_path = self._gemv_buffers(model, B, dev, dtype) if use else False

    def _gemv_buffers(self, model, B: int, dev, dtype) -> bool:
        """Workspaces of the ``FUSED_GEMV`` path; False where it does not apply."""
        from srl.kernels import decode_gemv as dg
        from srl.kernels.decode_step import INTERPRET

        cfg = model.config
        D = cfg.d_model
        if (B > dg.MAX_ROWS or D > 1024 or model.blocks[0].gated is not None
                or not (dev.type == "cuda" or INTERPRET)):
            return False
        hidden = model.blocks[0].fc.weight.shape[0]
        self.x2 = torch.zeros_like(self.x)
        self.qkv = torch.zeros(B, 3 * D, device=dev, dtype=dtype)
        self.act = torch.zeros(B, hidden, device=dev, dtype=dtype)
        self.part_proj = torch.zeros(dg.split_count(D), B, D, device=dev, dtype=torch.float32)
        self.part_mlp = torch.zeros(dg.split_count(hidden), B, D, device=dev, dtype=torch.float32)
        self.zero_lens = torch.zeros(B, device=dev, dtype=torch.long)
        self.logits_buf = torch.zeros(B, cfg.vocab_size, device=dev, dtype=dtype)
        self.head_part = torch.zeros(B, dg.head_chunks(cfg.vocab_size), 4, device=dev, dtype=torch.float32)
        self.part_attn = torch.zeros(cfg.n_heads, B, D, device=dev, dtype=torch.float32)
        return True

    def __call__(self, generator: torch.Generator | None = None) -> None:
        from srl.kernels.decode_step import embed_norm, residual_norm, rope_attend, sample_write

        if self.gemv_path:
            return self._gemv_step(generator)
        m, cache, st = self.model, self.cache, self.state
        lens, blocks, x, h = cache.lens, m.blocks, self.x, self.h
        embed_norm(st.tokens, lens, m.embed.weight, blocks[0].norm1.weight, blocks[0].norm1.eps, x, h)
        for i, blk in enumerate(blocks):
            rope_attend(F.linear(h, blk.qkv.weight), self.freqs, lens, cache.k[i], cache.v[i],
                        self.attn, blk.n_heads)
            residual_norm(x, F.linear(self.attn, blk.proj.weight), blk.norm2.weight, blk.norm2.eps, h)
            nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else m.norm
            part = fused_cats_mlp(blk.gated, h) if self.fuse_cats_cast else None
            if part is not None:
                residual_norm(x, part[0], nxt.weight, nxt.eps, h, counter=part[1])
            else:
                residual_norm(x, blk.mlp(h), nxt.weight, nxt.eps, h)
        logits = F.linear(h, m.head.weight)  # (B, V)
        if self.torch_sampling:
            return self._torch_sample(logits, generator)
        self.noise.exponential_(1.0, generator=generator)
        sample_write(logits, self.noise, st.tokens, st.logp, lens, st.end, self.params.temperature,
                     self.part)

    def _gemv_step(self, generator) -> None:
        """The ``FUSED_GEMV`` step: residual stream alternating between x (after attention's
        input norm) and x2 (after the MLP's), each kernel reading one and writing the other."""
        from srl.kernels.decode_gemv import head_sample
        from srl.kernels.decode_step import sample_write

        m, st, lens = self.model, self.state, self.cache.lens
        self._gemv_layers(st.tokens, lens, lens)
        if self.torch_sampling:
            return self._torch_sample(self._gemv_head(), generator)
        self.noise.exponential_(1.0, generator=generator)
        if CUBLAS_HEAD:
            sample_write(self._gemv_head(), self.noise, st.tokens, st.logp, lens, st.end,
                         self.params.temperature, self.part)
            return
        head_sample(self.x2, self.part_mlp, m.norm.weight, m.norm.eps, m.head.weight, self.logits_buf,
                    self.noise, self.head_part, self.params.temperature, st.tokens, st.logp, lens, st.end)

    def _gemv_head(self) -> Tensor:
        """Logits (B, V) of the final residual stream (x2 + the last fc_out's partials): the
        Triton head with the final norm as prologue, or (``CUBLAS_HEAD``) the norm, then cuBLAS."""
        from srl.kernels.decode_gemv import head_sample, norm_rows

        m = self.model
        if CUBLAS_HEAD:
            norm_rows(self.x2, self.part_mlp, m.norm.weight, m.norm.eps, self.h)
            return F.linear(self.h, m.head.weight)
        head_sample(self.x2, self.part_mlp, m.norm.weight, m.norm.eps, m.head.weight, self.logits_buf,
                    None, None, 1.0)
        return self.logits_buf

    def logits(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits (B, V) of one token per row: tokens
        (B, 1) at positions (B,), which are also their cache slots; the cache's lens are not read
        or changed. A draft's autoregressive step in speculative sampling (``FUSED_GEMV`` path)."""
        if not self.gemv_path:
            raise ValueError("FusedDecodeStep.logits needs the FUSED_GEMV path (see _gemv_buffers)")
        self._gemv_layers(tokens, self.zero_lens, positions)
        return self._gemv_head()

    def race(self, tokens: Tensor, positions: Tensor, logits: Tensor, noise: Tensor, spart: Tensor) -> None:
        """``logits`` but into the given (B, V) buffer, with the first stage of the exponential
        race against ``noise`` (B, V) into ``spart`` (B, race_chunks(), 4): a draft step of
        standard speculative sampling whose token is then drawn by ``spec_select.draft_merge``."""
        from srl.kernels.decode_gemv import head_sample
        from srl.kernels.decode_step import sample_chunks

        if not self.gemv_path:
            raise ValueError("FusedDecodeStep.race needs the FUSED_GEMV path (see _gemv_buffers)")
        m, T = self.model, self.params.temperature
        self._gemv_layers(tokens, self.zero_lens, positions)
        if CUBLAS_HEAD:
            logits.copy_(self._gemv_head())
            sample_chunks(logits, noise, spart, T)
            return
        head_sample(self.x2, self.part_mlp, m.norm.weight, m.norm.eps, m.head.weight, logits, noise, spart,
                    T, merge=False)

    def race_chunks(self) -> int:
        """Chunks of ``race``'s first stage (the second dim of its ``spart``)."""
        from srl.kernels.decode_gemv import head_chunks
        from srl.kernels.decode_step import sample_workspace

        V = self.model.config.vocab_size
        return sample_workspace(1, V, "cpu").shape[1] if CUBLAS_HEAD else head_chunks(V)

    def _gemv_layers(self, tokens: Tensor, tok_at: Tensor, lens: Tensor) -> None:
        """The layers of the ``FUSED_GEMV`` step: input token tokens[b, tok_at[b]] at position and
        slot lens[b]; the final residual stream is x2 + part_mlp summed (the head's prologue)."""
        from srl.kernels.decode_gemv import attend_proj, gemv_norm, gemv_split
        from srl.kernels.decode_step import rope_attend

        m, cache, x, x2 = self.model, self.cache, self.x, self.x2
        for i, blk in enumerate(m.blocks):
            n1 = blk.norm1
            if i == 0:
                gemv_norm(blk.qkv.weight, n1.weight, n1.eps, x, self.qkv, tokens=tokens, lens=tok_at,
                          embedding=m.embed.weight)
            else:
                gemv_norm(blk.qkv.weight, n1.weight, n1.eps, x, self.qkv, x_in=x2, part=self.part_mlp)
            if ATTEND_PROJ:
                attend_proj(self.qkv, self.freqs, lens, cache.k[i], cache.v[i], blk.proj.weight,
                            self.part_attn, blk.n_heads)
            else:
                rope_attend(self.qkv, self.freqs, lens, cache.k[i], cache.v[i], self.attn, blk.n_heads)
                gemv_split(self.attn, blk.proj.weight, self.part_proj)
            gemv_norm(blk.fc.weight, blk.norm2.weight, blk.norm2.eps, x2, self.act, x_in=x,
                      part=self.part_attn if ATTEND_PROJ else self.part_proj, gelu=True)
            gemv_split(self.act, blk.fc_out.weight, self.part_mlp)

    def _torch_sample(self, logits: Tensor, generator) -> None:
        """top-k / top-p: the torch sampling of ``decode_one_token`` on the fused model output."""
        from srl.generation.sampling import probs_from_params, sample_from_probs

        lens, st = self.cache.lens, self.state
        probs = probs_from_params(logits, self.params)
        y = sample_from_probs(probs, generator)
        logp = probs.gather(1, y[:, None]).log()
        active = (lens + 1 < st.end).long()
        st.write(lens, y[:, None], logp, active)
        lens.add_(active)


class FusedChunk:
    """Logits of T consecutive tokens per row in few launches: ``chunk(tokens, lens)`` runs
    tokens (B, T) at slots and positions lens[b] + 0..T-1 through ``model``, writing their keys
    and values to ``cache`` (its lens are not read or changed). Token i sees the slots before
    lens[b] and the chunk's tokens 0..i: the target's verification pass of standard speculative
    sampling (x0 and the L drafted tokens) and the draft's two-token re-feed.

    Per layer: the qkv matmul (cuBLAS, M = B * T rows), one rotary + cache write + attention
    kernel over the chunk (``decode_step.rope_attend_rows``), the output projection, residual +
    norm, the MLP and residual + norm; per call the embedding + norm and the head over the
    ``head_rows`` last rows. The torch forward launches about three times as many kernels (rotary in
    complex float32, cache scatters, the mask, copies around attention), the cost that sets the
    time at batch 1."""

    def __init__(self, model, cache, batch: int, T: int):
        why = fused_unsupported(model, None)
        if why is not None:
            raise ValueError(f"FusedChunk cannot run this model: {why}")
        cfg = model.config
        dev, dtype = model.embed.weight.device, model.embed.weight.dtype
        self.model, self.cache, self.B, self.T = model, cache, batch, T
        self.x = torch.zeros(batch * T, cfg.d_model, device=dev, dtype=dtype)
        self.h = torch.zeros_like(self.x)
        self.attn = torch.zeros_like(self.x)
        self.zero = torch.zeros(batch * T, device=dev, dtype=torch.long)
        self.freqs = torch.view_as_real(model.rotary.freqs).contiguous()

    def __call__(self, tokens: Tensor, lens: Tensor, head_rows: int | None = None,
                 out: Tensor | None = None) -> Tensor:
        """Logits (B, head_rows or T, V) of the last ``head_rows`` tokens of each row; with
        ``out`` (B, V) and head_rows 1, the last token's logits written there (returned)."""
        from srl.kernels.decode_step import embed_norm, rope_attend_rows, residual_norm

        m, cache, x, h, B, T = self.model, self.cache, self.x, self.h, self.B, self.T
        if tokens.shape != (B, T):
            raise ValueError(f"FusedChunk: tokens must be {(B, T)}, got {tuple(tokens.shape)}")
        blocks = m.blocks
        flat = tokens.reshape(B * T, 1)
        embed_norm(flat, self.zero, m.embed.weight, blocks[0].norm1.weight, blocks[0].norm1.eps, x, h)
        for i, blk in enumerate(blocks):
            rope_attend_rows(F.linear(h, blk.qkv.weight), self.freqs, lens, cache.k[i], cache.v[i],
                             self.attn, blk.n_heads, T)
            residual_norm(x, F.linear(self.attn, blk.proj.weight), blk.norm2.weight, blk.norm2.eps, h)
            nxt = blocks[i + 1].norm1 if i + 1 < len(blocks) else m.norm
            residual_norm(x, blk.mlp(h), nxt.weight, nxt.eps, h)
        rows = T if head_rows is None else head_rows
        hv = h.view(B, T, -1)[:, T - rows:]
        if out is not None:
            if rows != 1:
                raise ValueError("FusedChunk: out needs head_rows 1")
            return torch.mm(hv[:, 0], m.head.weight.t(), out=out)
        return F.linear(hv, m.head.weight)
