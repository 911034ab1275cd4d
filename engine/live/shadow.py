"""The context slide: a session's slid context, prefilled in a spare cache slot (the shadow)
while the session plays on, then swapped in (docs/engine-live.md, "Context overflow").

`Shadow` is the record a session's state keeps (what the shadow slot must hold; a rollback cuts
or drops it); `ContextSlider` is the scheduler's side: it owns the shadow slot, picks the
session to slide, feeds the slot a chunk per step and swaps it in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..context import slide_context
from ..decoder import Decoder
from ..tokenizer.vocab import Vocab
from .history import History, opens_pair

if TYPE_CHECKING:
    from .state import SessionState

logger = logging.getLogger(__name__)


def kept_suffix(vocab: Vocab, new: Sequence[int], hist: Sequence[int]) -> int:
    """How many of hist's last tokens end `new` (a slid context), at an event boundary.

    `slide_context` returns header + state + a suffix of the old context; the longest common
    suffix is that window (or a little more, where the state's last tokens happen to equal the
    tokens before the cut: the token sequence is the same either way), shortened until the
    token before it closes its pair.
    """
    k, n = 0, min(len(new), len(hist))
    while k < n and new[-k - 1] == hist[-k - 1]:
        k += 1
    while 0 < k < len(new) and opens_pair(vocab, new[-k - 1]):
        k -= 1
    return k


@dataclass
class Shadow:
    """A session's slid context as of position `start`; the tokens it adds later follow it."""

    new: list[int]  # slide_context at `start`: header + state + the window's tokens
    kept: int  # how many of new's last tokens are the session's own tokens before `start`
    start: int  # the session's position when it was made
    fed: int = 0  # tokens of `tokens()` already in the shadow slot's cache

    @classmethod
    def of(cls, history: History, keep_len: int) -> Shadow:
        """The slid context as it would be now."""
        new = slide_context(history.head + history.hist, history.vocab, keep_len)
        return cls(new, kept_suffix(history.vocab, new, history.hist), history.position)

    def head(self) -> list[int]:
        """What the context holds before the session's own tokens, once swapped in."""
        return self.new[: len(self.new) - self.kept]

    def base(self) -> int:
        """The session position the swapped-in window starts at."""
        return self.start - self.kept

    def tokens(self, history: History, lo: int = 0, hi: int | None = None) -> list[int]:
        """What the shadow slot must hold, [lo:hi]: the slid context, then every token since."""
        return (self.new + history.since(self.start))[lo:hi]

    def length(self, position: int) -> int:
        return len(self.new) + position - self.start

    def cut(self, p: int) -> bool:
        """A rollback to position p: the shadow loses what came after p too. False if it can't
        (p is before its window): then it is dropped."""
        if p >= self.start:
            self.fed = min(self.fed, self.length(p))
            return True
        drop = self.start - p
        if drop > self.kept:
            return False
        self.new, self.kept, self.start = self.new[: len(self.new) - drop], self.kept - drop, p
        self.fed = min(self.fed, len(self.new))
        return True


class ContextSlider:
    """The shadow slot: one session's slid context at a time, `chunk` tokens per step.

    A session past `start_len` tokens gets its slid context prefilled here, then swapped in: a
    slide (~1,000 tokens, hundreds of ms on a CPU) never stalls it or the others. A chunk makes
    its step slower for every session sampling in it (a response's first notes wait for it):
    chunks go in steps where no one samples, or once the session is within `urgent` tokens of
    overflowing (sessions that always sample: accompany).
    """

    def __init__(
        self, decoder: Decoder, slot: int, max_len: int, keep_len: int, chunk: int
    ) -> None:
        self.decoder, self.slot = decoder, slot
        self.max_len, self.keep_len, self.chunk = max_len, keep_len, chunk
        self.start_len = max(keep_len + 1, max_len - max_len // 4)
        self.urgent = max_len // 8
        self.owner: SessionState | None = None
        self._shadow: Shadow | None = None  # the owner's record this slot was filled for

    def step(self, states: Sequence[SessionState], sampling: bool) -> tuple[int, bool]:
        """Feed the shadow slot one chunk; swap it in once it holds its session's context.
        Returns (forwards run: 0 or 1, whether a slid context was swapped in)."""
        self._follow_owner()
        s = self.owner
        if s is None:
            over = [x for x in states if x.ctx_len() > self.start_len and x.at_boundary()]
            if not over:
                return 0, False
            s = self.owner = max(over, key=lambda x: x.ctx_len())
            self.decoder.reset(self.slot)
            self._shadow = s.shadow = Shadow.of(s.history, self.keep_len)
        sh = self._shadow
        assert sh is not None
        total = sh.length(s.position)
        n = 0
        urgent = s.ctx_len() > self.max_len - self.urgent
        if sh.fed < total and (urgent or not sampling):
            chunk = sh.tokens(s.history, sh.fed, sh.fed + self.chunk)
            self.decoder.extend([self.slot], [chunk])
            sh.fed += len(chunk)
            n = 1
        if sh.fed < total:
            return n, False
        # Caught up with the session: it becomes the session's cache.
        self.owner = self._shadow = None
        s.adopt_shadow(sh)
        self.decoder.move(self.slot, s.slot)
        self.decoder.reset(self.slot)
        logger.info("session %d: slid context swapped in, window from position %d", s.id, sh.base())
        return n, True

    def _follow_owner(self) -> None:
        """The owner's rollbacks, reset or close since the last step: crop the slot to what its
        record still holds, or let it go (the record was dropped)."""
        s, sh = self.owner, self._shadow
        if s is None or sh is None:
            return
        if s.shadow is not sh:
            self.owner = self._shadow = None
            self.decoder.reset(self.slot)
        elif self.decoder.length(self.slot) > sh.fed:
            self.decoder.crop(self.slot, sh.fed)
