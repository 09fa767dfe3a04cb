"""Static sparse attention patterns (S2-Attention, LongGen) and their tile lists.

A pattern says which key j a query i of head h may see, on absolute positions (a query row
i of an (Nq, Nk) call sits at key position Nk - Nq + i); every pattern is also causal (j <= i).

* :class:`SinkWindow` (LongGen's AttnSink layers): j < sink or i - j < window.
* :class:`S2Strided` (S2-Attention, LongGen's BlockSparse layers): with qb = i // block and
  kb = j // block, qb - kb < local_blocks or (kb + h) % stride == 0; heads take different
  residues, so together they see every block once H >= stride.
* :class:`BlockLayout`: a user's per-head boolean block map.

The kernels never look at masked tiles: for a tile grid of BLOCK_M query rows by BLOCK_N keys,
:func:`tile_lists` classes each tile as empty, partial (some keys masked: the kernel applies the
element mask) or full (no mask needed), and lists, per head and query tile (or per key tile for
the dK/dV kernel), the full and the partial tiles. Lists are cached per (pattern, shape, tiles).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# kernel codes of the pattern kinds (the ``KIND`` constexpr of the kernels)
KIND_SINK_WINDOW, KIND_S2, KIND_LAYOUT = 1, 2, 3


@dataclass(frozen=True)
class SinkWindow:
    """Key j is visible to query i iff j <= i and (j < sink or i - j < window)."""

    sink: int
    window: int

    def __post_init__(self):
        if self.sink < 0 or self.window < 1:
            raise ValueError(f"SinkWindow needs sink >= 0 and window >= 1, got sink={self.sink}, window={self.window}")

    def kernel_params(self) -> tuple[int, int, int, int]:
        return KIND_SINK_WINDOW, self.sink, self.window, 1

    def visible(self, rows: torch.Tensor, cols: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Element mask for absolute positions rows (..., R, 1), cols (..., 1, C); heads unused."""
        return (cols <= rows) & ((cols < self.sink) | (rows - cols < self.window))


@dataclass(frozen=True)
class S2Strided:
    """qb - kb < local_blocks, or key block kb is on head h's stride: (kb + h) % stride == 0."""

    block: int
    local_blocks: int
    stride: int

    def __post_init__(self):
        if self.block < 1 or self.local_blocks < 1 or self.stride < 1:
            raise ValueError(f"S2Strided needs block, local_blocks, stride >= 1, got {self}")

    def kernel_params(self) -> tuple[int, int, int, int]:
        return KIND_S2, self.block, self.local_blocks, self.stride

    def visible(self, rows: torch.Tensor, cols: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        qb, kb = rows // self.block, cols // self.block
        return (cols <= rows) & ((qb - kb < self.local_blocks) | ((kb + heads) % self.stride == 0))

    def block_map(self, heads: int, n_blocks: int, device) -> torch.Tensor:
        """(heads, n_blocks, n_blocks) bool: block (qb, kb) visible before the causal mask."""
        b = torch.arange(n_blocks, device=device)
        h = torch.arange(heads, device=device)
        local = (b[:, None] - b[None, :]) < self.local_blocks  # (qb, kb)
        strided = (b[None, :] + h[:, None]) % self.stride == 0  # (h, kb)
        return local[None] | strided[:, None, :]


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Per-head boolean block map ``layout`` (H, NQB, NKB) or (NQB, NKB) over ``block``-sized
    blocks of absolute positions; key j is visible to query i of head h iff j <= i and
    layout[h, i // block, j // block]. It must cover every position: NQB, NKB >= cdiv(Nk, block)."""

    layout: torch.Tensor
    block: int
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.block < 1:
            raise ValueError(f"BlockLayout.block must be >= 1, got {self.block}")
        if not isinstance(self.layout, torch.Tensor) or self.layout.dim() not in (2, 3):
            raise ValueError("BlockLayout.layout must be a 2-D (NQB, NKB) or 3-D (H, NQB, NKB) tensor")
        if self.layout.dim() == 2:
            object.__setattr__(self, "layout", self.layout[None])
        object.__setattr__(self, "layout", self.layout.to(torch.bool).contiguous())

    def kernel_params(self) -> tuple[int, int, int, int]:
        return KIND_LAYOUT, self.block, 1, 1

    def check(self, heads: int, n_k: int) -> None:
        hl, nqb, nkb = self.layout.shape
        need = -(-n_k // self.block)
        if hl not in (1, heads) or nqb < need or nkb < need:
            raise ValueError(f"BlockLayout.layout shape {tuple(self.layout.shape)} must be (1 or H={heads}, "
                             f">= {need}, >= {need}) for Nk={n_k} and block={self.block}")

    def visible(self, rows: torch.Tensor, cols: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        layout = self.layout.to(rows.device)
        qb = (rows // self.block).clamp(0, layout.shape[1] - 1)
        kb = (cols // self.block).clamp(0, layout.shape[2] - 1)
        hs = heads if layout.shape[0] > 1 else torch.zeros_like(heads)
        return (cols <= rows) & (cols >= 0) & layout[hs, qb, kb]

    def block_map(self, heads: int, n_blocks: int, device) -> torch.Tensor:
        return self.layout[:, :n_blocks, :n_blocks].to(device)


Pattern = SinkWindow | S2Strided | BlockLayout


def per_head(pattern: Pattern) -> bool:
    """Whether the pattern differs between heads (else one list serves every head)."""
    if isinstance(pattern, SinkWindow):
        return False
    if isinstance(pattern, BlockLayout):
        return pattern.layout.shape[0] > 1
    return pattern.stride > 1


def check_pattern(pattern, heads: int, n_k: int) -> None:
    if not isinstance(pattern, (SinkWindow, S2Strided, BlockLayout)):
        raise ValueError(f"pattern must be SinkWindow, S2Strided or BlockLayout, got {type(pattern).__name__}")
    if isinstance(pattern, BlockLayout):
        pattern.check(heads, n_k)


def dense_mask(pattern: Pattern, heads: int, n_q: int, n_k: int, device) -> torch.Tensor:
    """(heads or 1, Nq, Nk) bool: the element mask, query rows aligned bottom-right."""
    hp = heads if per_head(pattern) else 1
    rows = torch.arange(n_k - n_q, n_k, device=device)[None, :, None]  # (1, Nq, 1)
    cols = torch.arange(n_k, device=device)[None, None, :]  # (1, 1, Nk)
    hs = torch.arange(hp, device=device)[:, None, None]  # (hp, 1, 1)
    return pattern.visible(rows, cols, hs).expand(hp, n_q, n_k)


# --------------------------------------------------------------------------
# Tile classes: 0 empty, 1 partial, 2 full
# --------------------------------------------------------------------------
def _tile_bounds(n_q, n_k, block_m, block_n, device):
    """Absolute first/last valid row of every query tile (M,) and first/last key of every key
    tile (N,), plus whether the tile lies wholly inside the (Nq, Nk) rectangle."""
    shift = n_k - n_q
    m = torch.arange(-(-n_q // block_m), device=device)
    n = torch.arange(-(-n_k // block_n), device=device)
    r0 = m * block_m + shift
    r1 = torch.clamp((m + 1) * block_m, max=n_q) - 1 + shift
    c0 = n * block_n
    c1 = torch.clamp((n + 1) * block_n, max=n_k) - 1
    in_range = (((m + 1) * block_m <= n_q)[:, None]) & (((n + 1) * block_n <= n_k)[None, :])
    return r0[:, None], r1[:, None], c0[None, :], c1[None, :], in_range


def _rect_counts(integral, q0, q1, k0, k1):
    """Number of set blocks in [q0, q1] x [k0, k1] (broadcast index tensors) from a 2-D prefix sum."""
    return (integral[:, q1 + 1, k1 + 1] - integral[:, q0, k1 + 1]
            - integral[:, q1 + 1, k0] + integral[:, q0, k0])


def tile_classes(pattern: Pattern, heads: int, n_q: int, n_k: int, block_m: int, block_n: int,
                 device) -> torch.Tensor:
    """(heads or 1, M tiles, N tiles) int8: 0 no visible key, 1 some, 2 all (and in range).

    'some' may over-count (a masked tile costs time, not correctness); 'all' is exact."""
    r0, r1, c0, c1, in_range = _tile_bounds(n_q, n_k, block_m, block_n, device)
    causal_any = c0 <= r1
    causal_all = c1 <= r0
    if isinstance(pattern, SinkWindow):
        s, w = pattern.sink, pattern.window
        any_ = causal_any & ((c0 < s) | (torch.clamp(r0 - c1, min=0) < w))
        all_ = causal_all & ((c1 < s) | (r1 - torch.clamp(c0, min=s) < w))
        any_, all_ = any_[None], all_[None]
    else:
        b = pattern.block
        n_blocks = -(-n_k // b)
        hp = heads if per_head(pattern) else 1
        bmap = pattern.block_map(hp, n_blocks, device).to(torch.int32)  # (hp, NB, NB)
        integral = torch.nn.functional.pad(bmap.cumsum(1).cumsum(2), (1, 0, 1, 0))  # (hp, NB+1, NB+1)
        q0, q1 = (r0 // b).clamp(0, n_blocks - 1), (r1 // b).clamp(0, n_blocks - 1)
        k0, k1 = c0 // b, c1 // b
        count = _rect_counts(integral, q0, q1, k0, k1)  # (hp, M, N)
        any_ = causal_any[None] & (count > 0)
        all_ = causal_all[None] & (count == (q1 - q0 + 1) * (k1 - k0 + 1))
    return torch.where(all_ & in_range[None], 2, any_.to(torch.int64)).to(torch.int8)


def _lists(classes: torch.Tensor, which: int):
    """Per row of ``classes`` (hp, R, C): count (hp, R) and column indices (hp, R, max) of ``which``."""
    hit = classes == which
    counts = hit.sum(-1, dtype=torch.int32)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.sort(hit.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return counts.contiguous(), order[..., :width].to(torch.int32).contiguous()


@dataclass
class TileLists:
    """Tile lists of one (pattern, shape, tile) combination; per-head unless ``shared``."""

    full_cnt: torch.Tensor
    full_idx: torch.Tensor
    part_cnt: torch.Tensor
    part_idx: torch.Tensor
    shared: bool

    def as_runs(self) -> tuple["TileLists", torch.Tensor]:
        """The full lists as runs of consecutive tiles: (lists whose full_cnt / full_idx count and
        start the runs, run lengths shaped like the new full_idx). Cached."""
        if getattr(self, "_runs", None) is None:
            cnt, idx = self.full_cnt.long(), self.full_idx.long()  # (hp, R), (hp, R, W)
            t = torch.arange(idx.shape[-1], device=idx.device)
            valid = t < cnt[..., None]
            prev = torch.cat([idx[..., :1] - 2, idx[..., :-1]], -1)
            start = valid & (idx != prev + 1)  # (hp, R, W): a run begins at list entry t
            n_runs = start.sum(-1)
            width = max(int(n_runs.max()) if n_runs.numel() else 0, 1)
            pos = torch.sort(start.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
            r = torch.arange(width, device=idx.device)
            nxt = torch.cat([pos[..., 1:], pos[..., :1]], -1)
            end = torch.where(r + 1 < n_runs[..., None], nxt, cnt[..., None])
            run_len = torch.where(r < n_runs[..., None], end - pos, 0)
            runs = TileLists(n_runs.to(torch.int32).contiguous(), idx.gather(-1, pos).to(torch.int32).contiguous(),
                             self.part_cnt, self.part_idx, self.shared)
            self._runs = (runs, run_len.to(torch.int32).contiguous())
        return self._runs

    @property
    def visited(self) -> int:
        """Tiles visited over all heads in the lists (times heads when shared)."""
        return int(self.full_cnt.sum() + self.part_cnt.sum())


_LIST_CACHE: dict = {}
_LIST_CACHE_MAX = 64


def tile_lists(pattern: Pattern, heads: int, n_q: int, n_k: int, block_m: int, block_n: int, device,
               by_key: bool = False) -> TileLists:
    """Lists per (head, query tile), or with ``by_key`` per (head, key tile), of full and partial tiles."""
    key = (heads, n_q, n_k, block_m, block_n, str(device), by_key)
    cache = pattern._cache if isinstance(pattern, BlockLayout) else _LIST_CACHE
    key = key if isinstance(pattern, BlockLayout) else (pattern, *key)
    if key not in cache:
        if len(cache) >= _LIST_CACHE_MAX:
            cache.clear()
        classes = tile_classes(pattern, heads, n_q, n_k, block_m, block_n, device)
        if by_key:  # (hp, M, N) -> (hp, N, M)
            classes = classes.transpose(1, 2)
        full_cnt, full_idx = _lists(classes, 2)
        part_cnt, part_idx = _lists(classes, 1)
        cache[key] = TileLists(full_cnt, full_idx, part_cnt, part_idx, shared=classes.shape[0] == 1)
    return cache[key]


# --------------------------------------------------------------------------
# Per-layer patterns of a TransformerLM (LMConfig.attention)
# --------------------------------------------------------------------------
_SPEC_KEYS = {"pattern", "sink", "window", "block", "local_blocks", "stride", "hybrid", "dense_layers"}


def layer_patterns(spec: dict, n_layers: int) -> list:
    """Pattern of each layer (None: dense causal) from an ``attention`` spec.

    ``pattern``: dense (default) | sink_window (``sink``, ``window``) | s2 (``block``,
    ``local_blocks``, ``stride``). ``hybrid: true`` keeps LongGen's full-attention layers in the
    middle third, [n // 3, n - n // 3); ``dense_layers`` lists them explicitly instead."""
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise ValueError(f"LMConfig.attention has unknown keys {sorted(unknown)}; use {sorted(_SPEC_KEYS)}")
    kind = spec.get("pattern", "dense")
    if kind == "dense":
        return [None] * n_layers
    if kind == "sink_window":
        pattern = SinkWindow(int(spec.get("sink", 64)), int(spec.get("window", 2048)))
    elif kind == "s2":
        pattern = S2Strided(int(spec.get("block", 64)), int(spec.get("local_blocks", 16)), int(spec.get("stride", 8)))
    else:
        raise ValueError(f"LMConfig.attention.pattern must be dense, sink_window or s2, got {kind!r}")
    dense = set(spec.get("dense_layers", ()))
    if spec.get("hybrid", False):
        dense |= set(range(n_layers // 3, n_layers - n_layers // 3))
    if any(not 0 <= i < n_layers for i in dense):
        raise ValueError(f"LMConfig.attention.dense_layers must lie in [0, {n_layers}), got {sorted(dense)}")
    return [None if i in dense else pattern for i in range(n_layers)]
