"""Prefix caching: the keys and values of finished sequences, kept for prompts that start with one.

A chat sends its whole history each turn, and most applications put the same system prompt before
every request. A prompt is prefilled into a batch-1 `KVCache` with room for its completion too;
when the sequence finishes, the engine copies the keys and values of the tokens it generated
(except the last, never fed back) from its cache row into that room and keeps the cache here. A
new prompt whose first tokens are those takes them from here and is prefilled from there on, so
the fifth turn of a chat costs about what its new message costs, not the whole history. A prompt
that continues a whole entry takes the entry's cache itself when it has room for the prompt and
its completion (the engine leaves room for a next turn where that room costs no memory until
written): no allocation and no copy. Only the
generated tokens are copied when a sequence finishes (a 4,000-token prompt's keys and values
would take tens of milliseconds, a gap in every running stream).

Layers with a sliding window keep only their last `window` positions (a ring), so a sequence
longer than its window serves exactly its own length; one that fits serves any prefix of itself.
Entries are dropped least recently used first to stay within the byte budget; an entry a prefill
is reading stays alive until that prefill has copied it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from ..model import KVCache, copy_slices


# Tokens per level of the index: a prompt is matched by hashes of its first 16, 32, ... tokens,
# so that finding its longest stored prefix costs about a dictionary lookup per 16 of its tokens
# and a comparison of at most 16 tokens per entry sharing its deepest level, however many entries
# are stored. (Comparing the prompt with every entry, a few tensor operations each, took the
# serving engine's thread 1-9 ms an admission with a few hundred entries: a gap in every stream.)
BLOCK = 16


def block_hashes(tokens) -> list[int]:
    """The hash of tokens[:16], of tokens[:32], ...: one per whole block, each of all before it."""
    out, h = [], 0
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        h = hash((h, *tokens[end - BLOCK:end]))
        out.append(h)
    return out


@dataclass(eq=False)
class Entry:
    tokens: tuple[int, ...]  # the tokens whose keys and values `cache` holds
    cache: KVCache
    nbytes: int
    adapter: str | None = None  # the LoRA adapter that computed them (None: the base model)
    hashes: list[int] = field(default_factory=list)  # block_hashes(tokens): where the index holds it
    key: int = -1  # its key in PrefixCache.entries

    @property
    def whole_only(self) -> bool:
        """Whether only the whole entry can be reused: a layer's ring has wrapped."""
        return any(w is not None and len(self.tokens) > self.cache.size[w] for w in self.cache.windows)


def common_length(a, b, start: int) -> int:
    """How many first tokens the sequences a and b share, given that they share `start`."""
    n, m = start, min(len(a), len(b))
    while n < m and a[n] == b[n]:
        n += 1
    return n


class PrefixCache:
    """Stored sequences, at most `budget` bytes of keys and values, most recently used last."""

    def __init__(self, budget: int):
        self.budget = budget
        self.entries: collections.OrderedDict[int, Entry] = collections.OrderedDict()
        self.nbytes = 0
        self._next = 0
        self.hits, self.misses, self.hit_tokens = 0, 0, 0
        self.dropped: list[Entry] = []  # entries dropped since the owner last took them
        # The index: each block hash of an entry's tokens, and its first token, to the keys of the
        # entries with it (dicts: insertion-ordered sets).
        self._levels: dict[int, dict[int, None]] = {}
        self._first: dict[int, dict[int, None]] = {}

    def stats(self) -> dict:
        return {"entries": len(self.entries), "bytes": self.nbytes, "budget_bytes": self.budget,
                "hits": self.hits, "misses": self.misses, "hit_tokens": self.hit_tokens}

    def _sharing(self, ids, hashes: list[int]):
        """(k, keys) from the deepest level down: the entries whose first k blocks hash as ids's
        do (k = 0: those with its first token), each once, at the deepest level it shares."""
        seen: set[int] = set()
        for k in range(len(hashes), -1, -1):
            keys = self._levels.get(hashes[k - 1]) if k else self._first.get(ids[0])
            if keys:
                fresh = [key for key in keys if key not in seen]
                seen.update(fresh)
                yield k, fresh

    def match(self, prompt: list[int], adapter: str | None = None) -> tuple[Entry | None, int]:
        """The stored entry of the same adapter sharing the longest usable prefix with `prompt`, and
        that length: at most len(prompt) - 1 (the last prompt token must go through the model for
        its logits). Of entries sharing as much, the one stored first."""
        best, length = None, 0
        ids = tuple(prompt[:-1])
        if self.entries and ids:
            for k, keys in self._sharing(ids, block_hashes(ids)):
                start, usable = k * BLOCK, []
                for key in keys:
                    e = self.entries[key]
                    if e.adapter == adapter:  # other weights made other keys and values
                        n = common_length(ids, e.tokens, start)
                        if n and not (e.whole_only and n < len(e.tokens)):
                            usable.append((n, e))
                # the longest (the first stored of equals) whose first blocks do equal the prompt's
                # (equal hashes of unequal blocks: the next)
                head = ids[:start]
                best, length = next(((e, n) for n, e in sorted(usable, key=lambda u: -u[0])
                                     if e.tokens[:start] == head), (None, 0))
                if best is not None:  # deeper levels share more than any entry below them can
                    break
            if best is not None:
                self.entries.move_to_end(best.key)
        if best is None:
            self.misses += 1
        else:
            self.hits += 1
            self.hit_tokens += length
        return best, length

    def add(self, tokens: list[int], cache: KVCache, token_bytes: int, adapter: str | None = None) -> Entry | None:
        """Keep `cache` (batch 1), which holds the keys and values of `tokens` (cache.seen of them),
        as a new entry (returned; its key is never used again), unless it alone is over the budget
        (None); entries it extends are dropped. token_bytes: what one token's keys and values take
        (the budget counts what the entry holds, not its room)."""
        n = len(tokens)
        size = n * token_bytes
        if n < 2 or size > self.budget or cache.seen != n:
            return None
        ids = tuple(tokens)
        entry = Entry(ids, cache, size, adapter, block_hashes(ids), self._next)
        for _, keys in list(self._sharing(ids, entry.hashes)):
            for key in keys:
                e = self.entries[key]
                m = len(e.tokens)
                if e.adapter == adapter and m <= n and e.tokens == ids[:m] and (m == n or not entry.whole_only):
                    self._drop(key)  # a prefix of this one (or the same): this one serves it
        self.entries[entry.key] = entry
        for h in entry.hashes:
            self._levels.setdefault(h, {})[entry.key] = None
        self._first.setdefault(ids[0], {})[entry.key] = None
        self._next += 1
        self.nbytes += size
        while self.nbytes > self.budget:
            self._drop(next(iter(self.entries)))
        return entry

    def take(self, entry: Entry) -> None:
        """Remove `entry` without freeing it: a prompt that continues the whole of it goes on in its
        cache (the engine checks it has room), so nothing is allocated or copied."""
        if self.entries.get(entry.key) is not entry:
            raise KeyError("not an entry of this cache")
        self._remove(entry.key)

    def _remove(self, key: int) -> Entry:
        entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes
        for h in entry.hashes:
            keys = self._levels[h]
            del keys[key]
            if not keys:
                del self._levels[h]
        keys = self._first[entry.tokens[0]]
        del keys[key]
        if not keys:
            del self._first[entry.tokens[0]]
        return entry

    def _drop(self, key: int) -> None:
        self.dropped.append(self._remove(key))  # freed by the engine off its thread (Engine._free)

    @staticmethod
    def load_layers(entry: Entry, length: int, dst: KVCache):
        """Copy the first `length` tokens of `entry` into the empty batch-1 cache `dst` (of a
        prompt longer than `length`), which then continues from there: a generator that yields
        after each slice of a layer's keys and values (copy_slices: a 4,000-token prompt's are
        ~180 MB for SmolLM2, ~40 ms in one go, a gap that long in every running stream: the engine
        spreads them over turns)."""
        src = entry.cache
        for i, (w_src, w_dst) in enumerate(zip(src.windows, dst.windows)):
            n = min(length, src.size[w_src], dst.size[w_dst])  # a wrapped ring: all of it (length == n)
            for s in copy_slices(n, src.k[i]):
                dst.k[i][0, :, s] = src.k[i][0, :, s]
                dst.v[i][0, :, s] = src.v[i][0, :, s]
                yield
        for w_src, w_dst in zip(src.windows, dst.windows):
            s = min(length, src.size[w_src], dst.size[w_dst])
            dst.pos[w_dst][0, :s] = src.pos[w_src][0, :s]
        dst.seen = length
