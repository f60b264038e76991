"""The prefix cache's index: full KV pages by content hash, and the LRU of cached pages that no
sequence holds. Plain Python, no jax.

A full page is named by a hash chain: its hash covers its parent page's hash, its own token ids
and a salt (anything else that changes K/V: nothing today, a hook for adapters or images). Two
pages with the same hash therefore hold K/V of the same tokens at the same positions after the
same prefix, so one may stand in for the other. The digest is 128-bit BLAKE2b: a collision (two
different contents, one name) is not a practical concern, unlike Python's 64-bit `hash`.

Reference counts and the free list are the page allocator's (`page_allocator.py`); this module
only remembers which page holds which content and, among the pages nobody holds, which was
released longest ago (evicted first).
"""

from __future__ import annotations

import array
import collections
import hashlib
from collections.abc import Hashable, Sequence

PageHash = bytes


def page_hash(parent: PageHash | None, tokens: Sequence[int], salt: Hashable = None) -> PageHash:
    """The chain hash of a full page holding `tokens` after the page whose hash is `parent`
    (None for the first page). The salt enters every page (it is part of what K/V depends on)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent if parent is not None else b"root")
    h.update(array.array("q", tokens).tobytes())
    if salt is not None:
        h.update(repr(salt).encode())
    return h.digest()


class PrefixCache:
    """Which page holds which full-page content, and the cached pages nobody holds (LRU)."""

    def __init__(self) -> None:
        self.page_of: dict[PageHash, int] = {}
        self.hash_of: dict[int, PageHash] = {}
        # Cached pages with reference count 0, least recently released first: they count as
        # free, and are evicted (forgotten) in this order when a fresh page is needed.
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def num_evictable(self) -> int:
        return len(self.lru)

    def lookup(self, hashes: Sequence[PageHash]) -> list[int]:
        """Pages holding the longest cached run of this chain, from its first page."""
        pages = []
        for h in hashes:
            page = self.page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def register(self, page: int, h: PageHash) -> bool:
        """Records that `page` (held, fully computed) holds content `h`. A content already
        cached in another page is not recorded twice (this page then stays unnamed); False
        then."""
        if h in self.page_of:
            return self.page_of[h] == page
        assert page not in self.hash_of, f"page {page} already holds other content"
        self.page_of[h] = page
        self.hash_of[page] = h
        return True

    def is_cached(self, page: int) -> bool:
        return page in self.hash_of

    def park(self, page: int) -> None:
        """`page`, cached, is no longer held: it becomes the most recently released."""
        self.lru[page] = None

    def unpark(self, page: int) -> None:
        """`page` is held again (a cache hit)."""
        del self.lru[page]

    def evict(self) -> int:
        """Forgets the least recently released cached page and returns it, to be reused."""
        page, _ = self.lru.popitem(last=False)
        del self.page_of[self.hash_of.pop(page)]
        return page
