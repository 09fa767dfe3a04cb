"""Decoder-only transformer language model: pre-norm blocks, rotary positions, a KV cache.

The model reads like nanoGPT; what is different is the cache interface. Every cached forward
names, per token, the cache slot its keys and values go to, its rotary position, and which slots
it may attend to. That one interface serves plain decoding (one token per row, rows at different
lengths), prefill, and the tree-shaped verification pass of speculative decoding (k draft blocks
laid out side by side after a shared prefix). The layouts themselves live in
``srl.generation.decode``; the model only obeys them.

Shapes: B batch, T new tokens, S cache slots, H heads, D head dim, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class LMConfig:
    """Size and options of a :class:`TransformerLM`."""

    vocab_size: int
    """Number of token ids; round up to a multiple of 64 for fast matmuls on GPU."""
    d_model: int = 256
    """Residual stream width."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads; d_model must divide evenly."""
    max_seq_len: int = 1024
    """Longest position the rotary tables cover (and the default cache length)."""
    mlp_ratio: int = 4
    """Hidden width of the MLP as a multiple of d_model (GELU MLP, as in GPT-2)."""
    mlp: dict = field(default_factory=dict)
    """MLP options. ``type``: "gelu" (default, GPT-2) or "swiglu" (gated: SiLU(x W_gate) *
    (x W_up), then W_down; ``hidden`` sets its width, default mlp_ratio * d_model). ``cats:
    {sparsity: s}`` (swiglu only): at generation, zero gate activations below the per-layer CATS
    thresholds calibrated for sparsity s (``srl.generation.cats_calibration``)."""
    rope_base: float = 10000.0
    """Base of the rotary frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of the (bias-free) layer norms."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection (GPT-2 does)."""
    value_head: bool = False
    """Add a scalar value head on the final hidden state (PPO critic sharing the trunk)."""
    init_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    attention: dict = field(default_factory=dict)
    """Attention pattern per layer (``srl.kernels.sparse_attention``). ``pattern``: "dense" (default),
    "sink_window" (``sink``, ``window``) or "s2" (``block``, ``local_blocks``, ``stride``);
    ``hybrid: true`` keeps full attention in the middle third of the layers (LongGen),
    ``dense_layers`` names them explicitly."""
    residual: str = "standard"
    """"standard": each sub-block adds its output before the next reads the stream. "ladder"
    (Ladder Residual, arXiv 2501.06589): a sub-block's output is added one sub-block later, so
    under tensor parallelism its all-reduce overlaps the next sub-block's compute."""
    kernels: bool = True
    """On CUDA, dense attention runs srl's FlashAttention kernels (causal training and scoring,
    prefill and speculative verification over the cache); False runs torch's SDPA (comparison)."""

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> "LMConfig":
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"LMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"LMConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.residual not in ("standard", "ladder"):
            raise ValueError(f"LMConfig.residual must be 'standard' or 'ladder', got {self.residual!r}")
        _check_mlp(self.mlp, self.d_model * self.mlp_ratio)
        if self.attention:
            from srl.kernels._sparse_patterns import layer_patterns
            layer_patterns(self.attention, self.n_layers)
        if self.head_dim % 2:
            raise ValueError(
                f"LMConfig.d_model / n_heads = {self.head_dim} must be even for rotary positions"
            )
        return self


def _check_mlp(mlp: dict, default_hidden: int) -> None:
    """Validate ``LMConfig.mlp`` in place, filling in type and hidden width."""
    unknown = set(mlp) - {"type", "hidden", "cats"}
    if unknown:
        raise ValueError(f"LMConfig.mlp has unknown keys {sorted(unknown)}; use type, hidden, cats")
    mlp.setdefault("type", "gelu")
    mlp.setdefault("hidden", default_hidden)
    if mlp["type"] not in ("gelu", "swiglu"):
        raise ValueError(f"LMConfig.mlp.type must be 'gelu' or 'swiglu', got {mlp['type']!r}")
    if int(mlp["hidden"]) < 1:
        raise ValueError(f"LMConfig.mlp.hidden must be >= 1, got {mlp['hidden']}")
    cats = mlp.get("cats")
    if cats is not None:
        if mlp["type"] != "swiglu":
            raise ValueError("LMConfig.mlp.cats needs mlp.type 'swiglu' (CATS sparsifies a gate)")
        if not isinstance(cats, dict) or not 0.0 <= float(cats.get("sparsity", -1)) < 1.0:
            raise ValueError(f"LMConfig.mlp.cats must be {{sparsity: s}} with 0 <= s < 1, got {cats!r}")


class KVCache:
    """Keys and values of every layer, [n_layers, B, H, S, D], and per-row valid lengths.

    ``lens[b]`` counts the slots of row b whose entries are final; slots at or past it may hold
    stale entries from rejected drafts, which the attention masks never expose.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lens = torch.zeros(batch, device=device, dtype=torch.long)
        # position held by each slot, -1 if none: sparse attention patterns mask by position
        self.slot_pos = torch.full((batch, max_len), -1, device=device, dtype=torch.long)

    @classmethod
    def for_model(cls, config: LMConfig, batch: int, max_len: int | None = None, device=None,
                  dtype=torch.float32) -> "KVCache":
        return cls(config.n_layers, batch, config.n_heads, max_len or config.max_seq_len,
                   config.head_dim, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, slots: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, D) at ``slots`` (B, T); return the layer's full (B, H, S, D)."""
        B, H, T, D = k.shape
        idx = slots[:, None, :, None].expand(B, H, T, D)
        self.k[layer].scatter_(2, idx, k)
        self.v[layer].scatter_(2, idx, v)
        return self.k[layer], self.v[layer]

    def move_slots(self, src: Tensor, dst: Tensor) -> None:
        """Copy every layer's entries at slots ``src`` (B, n) to slots ``dst`` (B, n)."""
        L, B, H, S, D = self.k.shape
        n = src.shape[1]
        src_idx = src[None, :, None, :, None].expand(L, B, H, n, D)
        dst_idx = dst[None, :, None, :, None].expand(L, B, H, n, D)
        for buf in (self.k, self.v):
            buf.scatter_(3, dst_idx, buf.gather(3, src_idx))
        self.slot_pos.scatter_(1, dst, self.slot_pos.gather(1, src))

    def note_positions(self, slots: Tensor, positions: Tensor) -> None:
        """Record the positions (B, T) written to ``slots`` (B, T) in ``slot_pos`` (B, S)."""
        self.slot_pos.scatter_(1, slots, positions)


class RotaryTable(nn.Module):
    """cos + i sin of every (position, frequency) pair, as a complex table (max_seq_len, D/2)."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
        self.register_buffer("freqs", torch.polar(torch.ones_like(angles), angles).to(torch.complex64),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        # follow the module's device but stay complex64 (model.to(bfloat16) would drop the phase)
        freqs = self._buffers.pop("freqs")
        out = super()._apply(fn, recurse)
        self._buffers["freqs"] = freqs.to(fn(torch.empty(0, device=freqs.device)).device)
        return out

    def forward(self, positions: Tensor) -> Tensor:
        return self.freqs[positions][:, :, None, None, :]  # (B, T, 1, 1, D/2): over q/k and heads


def apply_rotary(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x (..., D) by the complex ``freqs`` (..., D/2)."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)


def no_reduce(branch: Tensor):
    """A single process's branch output is complete: the 'pending reduction' is the tensor itself.

    Tensor parallelism (``srl.parallel``) swaps ``Block.reduce`` for an all-reduce that starts
    now and is awaited when the returned callable is called.
    """
    return lambda: branch


@dataclass
class SlotMask:
    """Which cache slots each new token sees: ``dense`` (B, T, S) bool, and the same layout as
    arguments of srl's FlashAttention where it has that shape (see ``flash_attention``): valid
    slots per row ``kv_lens`` (B,) with the causal end aligned to them, optional per-token starts
    ``kv_start`` (B, T) and a prefix ``kv_prefix`` (B,) every token sees. The samplers' layouts
    (``srl.generation.decode``) build both; a plain bool tensor works too (SDPA only)."""

    dense: Tensor
    kv_lens: Tensor
    kv_start: Tensor | None = None
    kv_prefix: Tensor | None = None


@dataclass
class AttnMask:
    """A cached forward's mask as every layer takes it: additive (B, 1, T, S) for SDPA and the
    kernel's form (a :class:`SlotMask`) when the layout has one."""

    additive: Tensor
    slots: SlotMask | None = None


def _kernels_apply(q: Tensor) -> bool:
    """srl's FlashAttention runs this call: CUDA, and a head width and dtype the kernels take."""
    from srl.kernels._flash_common import SUPPORTED_HEAD_DIMS
    return q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS and q.dtype in (torch.float16, torch.bfloat16, torch.float32)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask | None, causal: bool, kernels: bool = True) -> Tensor:
    """Attention on (B, H, N, D) tensors: srl's FlashAttention on CUDA (the causal forward of
    training and scoring, and cached calls whose mask has the kernel's form), else SDPA."""
    if kernels and _kernels_apply(q) and (mask is None or mask.slots is not None):
        from srl.kernels import flash_attention
        if mask is None:
            return flash_attention(q, k, v, causal=causal)
        m = mask.slots
        return flash_attention(q, k, v, causal=True, kv_lens=m.kv_lens, kv_start=m.kv_start, kv_prefix=m.kv_prefix)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.additive)


def attend_pattern(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, pattern,
                   cache: KVCache | None, slots: Tensor | None) -> Tensor:
    """Attention restricted to a sparse ``pattern`` (``srl.kernels.sparse_attention``): the sparse
    kernel without a cache; with one, SDPA under ``mask`` and the pattern over slot positions."""
    from srl.kernels.sparse_attention import sparse_attention
    if cache is None:
        return sparse_attention(q, k, v, pattern)
    kpos = cache.slot_pos[:, None, None, :]  # (B, 1, 1, S)
    qpos = cache.slot_pos.gather(1, slots)[:, None, :, None]  # (B, 1, T, 1)
    heads = torch.arange(q.shape[1], device=q.device)[None, :, None, None]  # (1, H, 1, 1)
    allowed = pattern.visible(qpos, kpos, heads) & (kpos >= 0)  # (B, H, T, S)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.where(allowed, mask.additive, float("-inf")))


class GatedMLP(nn.Module):
    """SwiGLU MLP, down(SiLU(gate(h)) * up(h)); with a CATS threshold the gate activations with
    |SiLU| <= threshold are zeroed and, at decode, their rows of up and down are not read."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)
        self.cats_threshold: float | None = None

    def enable_cats(self, threshold: float | None) -> None:
        """Use CATS with ``threshold`` from now on (None: dense). Stores down transposed once."""
        from srl.kernels.cats import transpose_down_storage

        self.cats_threshold = None if threshold is None else float(threshold)
        if threshold is not None and not self.down.weight.t().is_contiguous():
            self.down.weight.data = transpose_down_storage(self.down.weight.data)

    def forward(self, h: Tensor) -> Tensor:
        if self.cats_threshold is None:
            return self.down(F.silu(self.gate(h)) * self.up(h))
        from srl.kernels.cats import cats_mlp

        return cats_mlp(h, self.gate.weight, self.up.weight, self.down.weight, self.cats_threshold)


class Block(nn.Module):
    pattern = None  # sparse attention pattern of this layer (LMConfig.attention); None: dense
    kernels = True  # dense attention on srl's kernels where they apply (LMConfig.kernels)

    def __init__(self, cfg: LMConfig, index: int):
        super().__init__()
        self.index = index
        self.n_heads = cfg.n_heads  # heads of this process (fewer under tensor parallelism)
        self.head_dim = cfg.head_dim
        self.reduce = no_reduce  # branch output -> callable returning it summed over ranks
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.gated = GatedMLP(cfg.d_model, cfg.mlp["hidden"]) if cfg.mlp["type"] == "swiglu" else None
        if self.gated is None:
            self.fc = nn.Linear(cfg.d_model, cfg.mlp["hidden"], bias=False)
            self.fc_out = nn.Linear(cfg.mlp["hidden"], cfg.d_model, bias=False)

    def forward(self, x: Tensor, freqs: Tensor, cache: KVCache | None, slots: Tensor | None,
                mask: Tensor | None) -> Tensor:
        """Standard residual wiring (ladder wiring is :meth:`TransformerLM._ladder`)."""
        x = x + self.reduce(self.attention(self.norm1(x), freqs, cache, slots, mask))()
        return x + self.reduce(self.mlp(self.norm2(x)))()

    def attention(self, h: Tensor, freqs: Tensor, cache: KVCache | None, slots: Tensor | None,
                  mask: Tensor | None) -> Tensor:
        """Attention branch on the normed stream h (B, T, C), before any cross-rank reduction."""
        B, T, _ = h.shape
        H, D = self.n_heads, self.head_dim
        qkv = self.qkv(h).view(B, T, 3, H, D)
        qk = apply_rotary(qkv[:, :, :2], freqs)  # q and k together: (B, T, 2, H, D)
        # (B, T, H, D) -> (B, H, T, D)
        q, k, v = qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2), qkv[:, :, 2].transpose(1, 2)
        if cache is not None:
            k, v = cache.write(self.index, slots, k, v)  # (B, H, S, D)
        if self.pattern is None:
            y = attend(q, k, v, mask, causal=cache is None, kernels=self.kernels)
        else:
            y = attend_pattern(q, k, v, mask, self.pattern, cache, slots)
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))

    def mlp(self, h: Tensor) -> Tensor:
        """MLP branch on the normed stream h (B, T, C), before any cross-rank reduction."""
        if self.gated is not None:
            return self.gated(h)
        return self.fc_out(F.gelu(self.fc(h), approximate="tanh"))


class TransformerLM(nn.Module):
    """Decoder-only LM. ``forward(tokens) -> logits``; with a cache, see :meth:`forward`."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config.validate()
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=False)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.head.weight = self.embed.weight
        self.value = nn.Linear(config.d_model, 1) if config.value_head else None
        self.rotary = RotaryTable(config.head_dim, config.max_seq_len, config.rope_base)
        for block in self.blocks:
            block.kernels = config.kernels
        if config.attention:
            from srl.kernels._sparse_patterns import layer_patterns
            for block, pattern in zip(self.blocks, layer_patterns(config.attention, config.n_layers)):
                block.pattern = pattern
        self.apply(self._init)
        for block in self.blocks:  # GPT-2: scale the residual projections by depth
            out = block.gated.down if block.gated is not None else block.fc_out
            for w in (block.proj.weight, out.weight):
                nn.init.normal_(w, std=config.init_std / math.sqrt(2 * config.n_layers))

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if non_embedding else n

    def hidden(self, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None,
               slots: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        B, T = tokens.shape
        if positions is None:
            positions = torch.arange(T, device=tokens.device).expand(B, T)
        if cache is not None and (slots is None or mask is None):
            raise ValueError("a cached forward needs slots (B, T) and mask (B, T, S)")
        slot_mask = mask if isinstance(mask, SlotMask) else None
        mask = mask.dense if slot_mask is not None else mask
        x = self.embed(tokens)
        freqs = self.rotary(positions)
        if cache is not None and any(block.pattern is not None for block in self.blocks):
            cache.note_positions(slots, positions)
        attn_mask = None
        if mask is not None:  # additive, built once for all layers: (B, 1, T, S) over heads
            attn_mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device)
            attn_mask = AttnMask(attn_mask.masked_fill_(~mask, float("-inf"))[:, None], slot_mask)
        if self.config.residual == "ladder":
            x = self._ladder(x, freqs, cache, slots, attn_mask)
        else:
            for block in self.blocks:
                x = block(x, freqs, cache, slots, attn_mask)
        return self.norm(x)

    def _ladder(self, x: Tensor, freqs: Tensor, cache: KVCache | None, slots: Tensor | None,
                mask: Tensor | None) -> Tensor:
        """Ladder Residual: each branch reads the stream without the previous branch's output.

        Block i adds attention_{i-1} (awaited), computes attention_i and starts its reduction,
        adds mlp_{i-1}, computes mlp_i and starts its reduction; the last two are added at the
        end. Single process: only a different architecture; tensor parallel: the all-reduce of
        one branch runs while the next one computes.
        """
        attn = mlp = None  # pending reductions of the previous block's branches
        for block in self.blocks:
            if attn is not None:
                x = x + attn()
            attn = block.reduce(block.attention(block.norm1(x), freqs, cache, slots, mask))
            if mlp is not None:
                x = x + mlp()
            mlp = block.reduce(block.mlp(block.norm2(x)))
        return x + attn() + mlp()

    def forward(self, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None,
                slots: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """Logits (B, T, V) of the next token after each of ``tokens`` (B, T).

        Without a cache: plain causal forward over positions 0..T-1 (training, scoring).
        With a cache: token t of row b gets rotary position ``positions[b, t]``, writes its keys
        and values to slot ``slots[b, t]`` and attends to the slots where ``mask[b, t]`` (S,) is
        true (its own slot included). The cache's ``lens`` are left to the caller. A
        :class:`SlotMask` (the samplers' layouts) lets that attention run on srl's kernels.
        """
        return self.head(self.hidden(tokens, cache, positions, slots, mask))

    def forward_with_value(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """(logits (B, T, V), values (B, T)) from one causal forward; needs ``value_head``."""
        if self.value is None:
            raise ValueError("LMConfig.value_head is False: this model has no value head")
        h = self.hidden(tokens)
        return self.head(h), self.value(h).squeeze(-1)


def gated_mlps(model: "TransformerLM") -> list["GatedMLP"]:
    """The gated MLP of every block, in order; ValueError if the model has none."""
    mlps = [b.gated for b in model.blocks if getattr(b, "gated", None) is not None]
    if not mlps:
        raise ValueError("model has no gated MLP: CATS needs LMConfig.mlp = {type: swiglu}")
    return mlps


def require_cats(model) -> None:
    """Samplers call this: a model whose config asks for CATS must have its thresholds set."""
    mlp = getattr(getattr(model, "config", None), "mlp", None) or {}
    if mlp.get("cats") is None or getattr(model, "cats_calibrating", False):
        return
    if any(m.cats_threshold is None for m in gated_mlps(model)):
        raise ValueError(
            f"LMConfig.mlp.cats = {mlp['cats']} but the model has no CATS thresholds: load it with "
            "srl.generation.cats_calibration.load_lm or set them with apply_cats")
