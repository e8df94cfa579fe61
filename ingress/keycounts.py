"""Open connections counted per key (``session.count_concurrent``). Private to the core.

In one process the counts are a dict. With ``server.workers`` > 1 every worker also publishes
its own counts in its own region of a table the parent maps before it forks, and a key's count
is the sum over the regions, like ``Server.connections``. A region is an open-addressing hash
table (linear probing, deletion by shifting entries back, so no tombstones pile up) of
``SLOTS`` slots: two 64-bit words of the key's 128-bit BLAKE2b digest and the count (0: free).
Only its worker writes a region, so no lock is needed; a worker reading another's region while
that one moves an entry may miss that entry for an instant, as with ``Server.connections``.
Distinct keys can only share a count if their 128-bit digests are equal.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import struct
from collections import Counter

log = logging.getLogger("ingress.server")

SLOTS = 16384  # per worker region; it takes at most SLOTS // 2 distinct keys (short probes)
WORDS = 3  # per slot: two words of the digest, then the count


def digest(key: str) -> tuple[int, int]:
    return struct.unpack("<qq", hashlib.blake2b(key.encode(), digest_size=16).digest())


def shared_table(context, workers: int, slots: int = SLOTS):
    """The table for *workers* regions, in memory shared across a fork."""
    return context.RawArray("q", workers * slots * WORDS)


def clear_region(table, slot: int, slots: int = SLOTS) -> None:
    """Forget the counts of worker *slot* (it ended, or starts afresh)."""
    size = ctypes.sizeof(ctypes.c_longlong) * slots * WORDS
    ctypes.memset(ctypes.addressof(table) + slot * size, 0, size)


class KeyCounts:
    def __init__(self, table=None, slot: int = 0, workers: int = 1, slots: int = SLOTS):
        self.own: Counter[str] = Counter()  # this process's open connections per key, exact
        self.table = table
        self.slot = slot
        self.workers = workers
        self.slots = slots
        self.base = slot * slots * WORDS  # where this worker's region starts
        self._warned = False

    def add(self, key: str) -> bool:
        """Count one more connection under *key*. False if it cannot be counted: this worker
        already holds SLOTS // 2 distinct keys (then it is not counted and not limited)."""
        if self.table is not None and key not in self.own:
            if len(self.own) >= self.slots // 2:
                if not self._warned:
                    log.warning("more than %d distinct keys open in one worker: further "
                                "ones are not counted", self.slots // 2)
                    self._warned = True
                return False
        self.own[key] += 1
        if self.table is not None:
            self._store(digest(key), self.own[key])
        return True

    def remove(self, key: str) -> None:
        count = self.own[key] - 1
        if count > 0:
            self.own[key] = count
        else:
            del self.own[key]
        if self.table is not None:
            self._store(digest(key), count)

    def total(self, key: str) -> int:
        """Open connections counted under *key* in all workers."""
        count = self.own.get(key, 0)
        if self.table is not None:
            words = digest(key)
            for slot in range(self.workers):
                if slot != self.slot:
                    index = self._find(slot * self.slots * WORDS, words)
                    count += self.table[index + 2] if index is not None else 0
        return count

    # --- a region ---------------------------------------------------------------------------

    def _find(self, base: int, words: tuple[int, int], free: bool = False) -> int | None:
        """The index of *words*' slot in the region at *base*; if it has none, the free slot
        where it would go when *free*, else None."""
        table, slots = self.table, self.slots
        position = words[0] % slots
        for _ in range(slots):
            index = base + position * WORDS
            if table[index + 2] == 0:
                return index if free else None
            if table[index] == words[0] and table[index + 1] == words[1]:
                return index
            position = (position + 1) % slots
        return None

    def _store(self, words: tuple[int, int], count: int) -> None:
        table, base = self.table, self.base
        index = self._find(base, words, free=True)
        if count > 0:
            table[index], table[index + 1] = words
            table[index + 2] = count
        elif index is not None and table[index + 2]:
            self._delete((index - base) // WORDS)

    def _delete(self, hole: int) -> None:
        """Empty slot *hole*, moving back later entries of its probe run that may not sit
        behind an empty slot (Knuth's algorithm R), so every lookup still finds its key."""
        table, base, slots = self.table, self.base, self.slots
        position = hole
        while True:
            position = (position + 1) % slots
            index = base + position * WORDS
            if table[index + 2] == 0:
                break
            home = table[index] % slots
            # The entry may fill the hole unless its home lies cyclically in (hole, position].
            if hole < position:
                movable = home <= hole or home > position
            else:
                movable = position < home <= hole
            if movable:
                target = base + hole * WORDS
                table[target], table[target + 1], table[target + 2] = (
                    table[index], table[index + 1], table[index + 2])
                hole = position
        target = base + hole * WORDS
        table[target + 2] = 0
        table[target] = table[target + 1] = 0
