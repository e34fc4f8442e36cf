"""The KV cache: keys and values of earlier tokens, and the plan each forward step follows to
write its new keys and read the ones to attend over (`AttentionPlan`, with its mask).

`KVCache` serves one batch whose rows advance together (generation, left-padded batches);
`RowKVCache` one whose rows advance independently (the serving engine). `Transformer.plans` builds
the plans of a step, through `KVCache.plan` when there is a cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

# What a copy between caches moves at most between two yields (keys and values): about a ms. A
# layer of a 4,000-token prompt is 16 MB for a model of 8 heads x 64, several ms in one piece, a
# gap that long in every stream the serving engine is decoding meanwhile.
COPY_SLICE_BYTES = 4 << 20


def copy_slices(n: int, k: torch.Tensor) -> list[slice]:
    """The first n slots of a cache layer `k` [B, heads, slots, head dim] in slices of at most
    COPY_SLICE_BYTES of keys and values."""
    per_slot = 2 * k.shape[1] * k.shape[3] * k.element_size()
    step = max(1, COPY_SLICE_BYTES // per_slot)
    return [slice(a, min(n, a + step)) for a in range(0, n, step)]


def ring_runs(first: int, end: int, size: int, size_dst: int):
    """Positions first .. end - 1 as (slots of a ring of `size`, slots of one of `size_dst`):
    slices where the positions are consecutive in both (position p in slot p % size)."""
    p = first
    while p < end:
        a, b = p % size, p % size_dst
        n = min(end - p, size - a, size_dst - b)
        yield slice(a, a + n), slice(b, b + n)
        p += n


@dataclass
class AttentionPlan:
    """How the layers of one window size attend in one forward step: which keys each query sees
    (`mask`, or `causal`, or all), and with a cache where the new keys go and which slots to read.
    `Transformer.plans` builds them; `Transformer.run_blocks` and `Attention.attend` follow them."""
    mask: torch.Tensor | None = None  # bool [B, 1, T, S]; None with causal=False: attend to all keys
    causal: bool = False
    write: slice | torch.Tensor | tuple | None = None  # cache slots receiving the new keys (RowKVCache: rows, slots)
    read: int = 0  # leading slots to attend over
    concat: bool = False  # rolling prefill: attend over old slots + all new keys, keep the newest


def causal_mask(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask from absolute positions qpos [B, T] of the queries and kpos [B, S]
    of the keys (-1 marks padding or an empty slot): each query sees the keys at its position and
    before, within `window` positions if one is given."""
    q, k = qpos[:, :, None], kpos[:, None, :]
    ok = (k >= 0) & (k <= q)
    if window is not None:
        ok &= q - k < window
    ok |= q < 0  # padding queries attend everywhere: finite garbage, never read, never NaN
    return ok[:, None]


class KVCache:
    """Keys and values of earlier tokens, preallocated per layer.

    Layers with a sliding window keep a rolling buffer of `window` slots, so a long generation
    with Mistral uses bounded memory. `pos` records the absolute position held by each slot
    (-1: empty or padding); masks are built from it, which also handles left-padded batches.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device=None, dtype=torch.float32,
                 zeros=torch.zeros):
        self.max_len, self.seen, self.padded = max_len, 0, False
        self.windows = [w if w and w < max_len else None for w in map(cfg.layer_window, range(cfg.num_layers))]
        self.size = {w: (w if w else max_len) for w in set(self.windows)}
        self.pos = {w: torch.full((batch, s), -1, dtype=torch.long, device=device) for w, s in self.size.items()}
        shape = lambda w: (batch, cfg.num_kv_heads, self.size[w], cfg.head_dim)  # noqa: E731
        # zeros(shape, device=, dtype=): torch.zeros, or the serving engine's allocator (one without OpenMP)
        self.k = [zeros(shape(w), device=device, dtype=dtype) for w in self.windows]
        self.v = [zeros(shape(w), device=device, dtype=dtype) for w in self.windows]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def plan(self, window: int | None, qpos: torch.Tensor) -> AttentionPlan:
        L, T, S, pos = self.seen, qpos.shape[1], self.size[window], self.pos[window]
        if window is None:  # one slot per position
            pos[:, L:L + T] = qpos
            kpos = pos[:, :L + T]
            if T == 1 and not self.padded:
                mask, causal = None, False
            elif L == 0 and not self.padded:
                mask, causal = None, True
            else:
                mask, causal = causal_mask(qpos, kpos, None), False
            return AttentionPlan(mask, causal, slice(L, L + T), L + T)
        if T == 1:  # rolling decode step: the slot overwritten is the one leaving the window
            slot = L % S
            pos[:, slot] = qpos[:, 0]
            read = min(L + 1, S)
            mask = causal_mask(qpos, pos[:, :read], window) if self.padded else None
            return AttentionPlan(mask, False, slice(slot, slot + 1), read)
        # Rolling prefill: earlier queries of this chunk still need the keys later ones overwrite.
        read, keep = min(L, S), min(T, S)
        kpos = torch.cat([pos[:, :read], qpos], 1)
        slots = torch.arange(L + T - keep, L + T, device=qpos.device) % S
        pos[:, slots] = qpos[:, T - keep:]
        if L == 0 and T <= window and not self.padded:
            return AttentionPlan(None, True, slots, read, concat=True)
        return AttentionPlan(causal_mask(qpos, kpos, window), False, slots, read, concat=True)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan):
        """Store the new keys/values and return the keys/values to attend over."""
        K, V = self.k[layer], self.v[layer]
        if plan.concat:
            keys, vals = torch.cat([K[:, :, :plan.read], k], 2), torch.cat([V[:, :, :plan.read], v], 2)
            n = len(plan.write)
            K[:, :, plan.write], V[:, :, plan.write] = k[:, :, -n:], v[:, :, -n:]
            return keys, vals
        K[:, :, plan.write], V[:, :, plan.write] = k, v
        return K[:, :, :plan.read], V[:, :, :plan.read]


class RowKVCache(KVCache):
    """A cache whose rows advance independently, for serving many requests in one batch
    (continuous batching, `slm.serve.engine`). Row b keeps position p in slot p % size, so a
    decode step writes one slot per row at that row's own position, and masks come from `pos`.

    A request's prompt is prefilled in an ordinary batch-1 KVCache and copied in with `load_row`.
    Steps take one token per row (position -1 marks an idle row, whose cache a step leaves as it
    is: a row being loaded meanwhile keeps what it got) and may cover only the first rows: idle
    rows at the end cost nothing."""

    # No length shared by all rows: positions are passed to every forward and kept per row in `pos`.
    seen = property(lambda self: 0, lambda self, value: None)

    def load_row(self, row: int, src: KVCache) -> None:
        """Copy a batch-1 cache, filled from position 0 without padding, into `row`. Both keep
        position p in slot p % size (src.size <= self.size, or both the same window). Only the
        slots src has filled are copied (it may have room for more)."""
        for _ in self.load_row_layers(row, src):
            pass

    def load_row_layers(self, row: int, src: KVCache | None, n: int | None = None):
        """load_row a piece at a time: a generator that yields after each slice of a layer's keys
        and values (copy_slices; a long prompt's are tens of MB: a server spreads them over several
        turns). The row is idle meanwhile (steps leave idle rows untouched); its positions go in last.
        n: copy only src's first n positions (a prompt that starts with them; src's ring layers must
        not have wrapped unless n is all src holds). src None (n 0): the row is emptied."""
        n = (src.seen if src is not None else 0) if n is None else n
        for i, w_src in enumerate(src.windows if n else []):
            for s in copy_slices(min(n, src.size[w_src]), src.k[i]):
                self.k[i][row, :, s], self.v[i][row, :, s] = src.k[i][0, :, s], src.v[i][0, :, s]
                yield
        for i, w in enumerate(self.windows):
            self.pos[w][row] = -1
            if n:
                m = min(n, src.size[src.windows[i]])
                self.pos[w][row, :m] = src.pos[src.windows[i]][0, :m]

    def keep_row(self, row: int, n: int) -> None:
        """What load_row(row, src, n) leaves in a row that holds src's keys and values already (the
        sequence src was saved from, untouched since): its positions from n on are forgotten, and
        nothing is copied."""
        for w in self.windows:
            held = self.pos[w][row]
            held[held >= n] = -1

    def save_row(self, row: int, dst: KVCache, end: int) -> None:
        """The inverse of load_row for the positions dst.seen .. end - 1 of `row`: copy them into
        the batch-1 cache dst (which has room for them), which then holds positions 0 .. end - 1."""
        start = dst.seen
        if end <= start:
            return
        for i, (w, w_dst) in enumerate(zip(self.windows, dst.windows)):
            S, S_dst = self.size[w], dst.size[w_dst]
            first = max(start, end - S_dst)  # older ones would be overwritten in dst's ring anyway
            # as runs of slots that wrap in neither ring: slices, not an index (a gather and a
            # scatter of each layer took ~15 ms for a finished SmolLM2 sequence of 80 tokens)
            for a, b in ring_runs(first, end, S, S_dst):
                dst.k[i][0, :, b] = self.k[i][row, :, a]
                dst.v[i][0, :, b] = self.v[i][row, :, a]
                dst.pos[w_dst][0, b] = self.pos[w][row, a]
        dst.seen = end

    def plan(self, window: int | None, qpos: torch.Tensor) -> AttentionPlan:
        if qpos.shape[1] != 1:
            raise ValueError("a RowKVCache steps one token per row; prefill in a KVCache and load_row it")
        B, S = qpos.shape[0], self.size[window]
        busy = (qpos[:, 0] >= 0).nonzero()[:, 0]  # an idle row (-1) is neither written nor read from
        rows, slots = busy, qpos[busy, 0] % S
        pos = self.pos[window][:B]
        pos[rows, slots] = qpos[busy, 0]
        read = min(int(qpos.max()) + 1, S)  # slots past the furthest row hold nothing yet
        return AttentionPlan(causal_mask(qpos, pos[:, :read], window), False, (rows, slots), read)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan):
        K, V, B = self.k[layer], self.v[layer], k.shape[0]
        rows, slots = plan.write
        K[rows, :, slots], V[rows, :, slots] = k[rows, :, 0], v[rows, :, 0]
        return K[:B, :, :plan.read], V[:B, :, :plan.read]
