"""A live session's token sequence, its constraint state, and rollback.

Scheduler thread only, except `tokens()`/`context()`: copies taken under `lock` (the one read
of a session's data from other threads; every change of the lists holds it).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..constraint_set import ConstraintSet
from ..grammar import BOUNDARY
from ..tokenizer.vocab import TokenType, Vocab

SNAPSHOT_EVERY = 16  # constraint-state snapshots every N positions (at event boundaries)


def opens_pair(vocab: Vocab, tok: int) -> bool:
    """PART and VEL must be followed by their partner: no event boundary right after them."""
    return vocab.type_of(tok) in (TokenType.PART, TokenType.VELOCITY)


class History:
    """Tokens from position `base` on (the window), the token time after each, the header a
    slid context starts with, and constraint-state snapshots to roll back to."""

    def __init__(self, vocab: Vocab, cs: ConstraintSet) -> None:
        self.vocab, self.cs = vocab, cs
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self.lock:
            self.hist: list[int] = []  # tokens from position base on
            self.ticks: list[int] = []  # token time after each of them
            self.head: list[int] = []  # header the slid context starts with (cache only)
            self.base = 0
            self.base_tick = 0
            self.given_upto = 0  # position after the last given token: inserts keep it
            self.given_tick = 0  # token time there
            self.cs.reset()
            self.snaps: dict[int, Any] = {0: self.cs.snapshot()}
            self.snap_keys: list[int] = [0]
            self.position = 0
            self.tick = 0

    # --- reads ------------------------------------------------------------------------------------
    def tokens(self) -> list[int]:
        """A copy of the tokens from the window start (any thread)."""
        with self.lock:
            return list(self.hist)

    def context(self) -> list[int]:
        """A copy of what the model sees: the slid header, then the window (any thread)."""
        with self.lock:
            return self.head + self.hist

    def ctx_len(self) -> int:
        return len(self.head) + len(self.hist)

    def context_from(self, n: int) -> list[int]:
        """The context's tokens from index n on (what the cache does not hold yet)."""
        h = len(self.head)
        return self.hist[n - h :] if n >= h else self.head[n:] + self.hist

    def since(self, position: int) -> list[int]:
        return self.hist[position - self.base :]

    def last(self) -> int:
        return self.hist[-1] if self.hist else -1

    def tick_at(self, position: int) -> int:
        """Token time after the first `position` tokens (position >= base)."""
        i = position - self.base
        return self.base_tick if i == 0 else self.ticks[i - 1]

    def at_boundary(self) -> bool:
        return not self.hist or not opens_pair(self.vocab, self.hist[-1])

    def grammar_boundary(self) -> bool:
        return int(self.cs.state.phase[0]) in BOUNDARY

    def boundary_before(self, position: int, floor: int) -> int:
        """`position` moved back (not below `floor`) until no pair is left open before it."""
        p = position
        while p > floor and opens_pair(self.vocab, self.hist[p - 1 - self.base]):
            p -= 1
        return p

    def position_after_tick(self, tick: int) -> int:
        """The position after the last token whose time-after is <= tick (ticks never fall)."""
        return self.base + bisect.bisect_right(self.ticks, tick)

    # --- changes ----------------------------------------------------------------------------------
    def push(self, tokens: Sequence[int], given: bool) -> None:
        """Append tokens (the cache catches up at the next forward)."""
        v = self.vocab
        with self.lock:
            for t in tokens:
                self.tick += v.shift_ticks(t)
                self.hist.append(t)
                self.ticks.append(self.tick)
                self.cs.observe(np.array([t]))
                self.position += 1
                if self.position % SNAPSHOT_EVERY == 0 and not opens_pair(v, t):
                    self.snaps[self.position] = self.cs.snapshot()
                    self.snap_keys.append(self.position)
            if given:
                self.given_upto, self.given_tick = self.position, self.tick

    def truncate(self, p: int) -> None:
        """Keep the first p tokens (base <= p <= position): the constraint state from the
        nearest snapshot at or before p, the rest replayed."""
        with self.lock:
            keep = p - self.base
            del self.hist[keep:], self.ticks[keep:]
            self.position, self.tick = p, self.tick_at(p)
            if self.given_upto > p:
                self.given_upto, self.given_tick = p, self.tick
            i = bisect.bisect_right(self.snap_keys, p)
            for k in self.snap_keys[i:]:
                del self.snaps[k]
            del self.snap_keys[i:]
            q = self.snap_keys[-1]
            self.cs.restore(self.snaps[q])
            self.cs.feed(self.hist[q - self.base : keep])

    def rebase(self, head: list[int], new_base: int) -> None:
        """The context becomes `head` + the tokens from position new_base on."""
        with self.lock:
            # A snapshot at the new window start, so rollback can still reach it.
            i = bisect.bisect_right(self.snap_keys, new_base) - 1
            q = self.snap_keys[i]
            live = self.cs.snapshot()
            self.cs.restore(self.snaps[q])
            self.cs.feed(self.hist[q - self.base : new_base - self.base])
            start_snap = self.cs.snapshot()
            self.cs.restore(live)
            self.snap_keys = [new_base] + [k for k in self.snap_keys if k > new_base]
            self.snaps = {k: self.snaps[k] for k in self.snap_keys[1:]}
            self.snaps[new_base] = start_snap
            self.base_tick = self.tick_at(new_base)
            drop = new_base - self.base
            del self.hist[:drop], self.ticks[:drop]
            self.head = head
            self.base = new_base
