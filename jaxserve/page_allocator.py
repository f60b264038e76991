"""The host page allocator: hands out KV-cache pages by reference count. Plain Python, no jax.

Page 0 is the trash page: padding tokens write their K/V there and no live sequence owns it, so
the step never needs a branch for "is this token real".

With a prefix cache, a page may be held by several sequences (a shared prefix); when the last
holder lets go of a page whose content the cache knows, the page is not freed but parked in the
cache's LRU: it still counts as free (`num_free`), and is only reused, and forgotten, when the
free list runs out (least recently released first).
"""

from __future__ import annotations

from jaxserve.prefix_cache import PrefixCache

TRASH_PAGE = 0


class PageAllocator:
    """A free list of page ids 1..num_pages-1 (page 0 is never handed out), reference counts,
    and optionally the prefix cache whose unheld pages count as free."""

    def __init__(self, num_pages: int, cache: PrefixCache | None = None):
        if num_pages < 2:
            raise ValueError(f"{num_pages=} must be at least 2 (page 0 is the trash page)")
        self.num_pages = num_pages
        self.cache = cache
        # Pop from the end, so low page ids go first (easier to read in tests and dumps).
        self._free = list(range(num_pages - 1, TRASH_PAGE, -1))
        self.refcount = [0] * num_pages

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: never-cached free pages plus evictable cached ones."""
        return len(self._free) + (self.cache.num_evictable if self.cache else 0)

    @property
    def num_cached(self) -> int:
        """Cached pages nobody holds (kept for reuse; evictable)."""
        return self.cache.num_evictable if self.cache else 0

    def allocate(self, n: int) -> list[int]:
        """`n` fresh pages (reference count 1): the free list first, then evicting cached pages
        least recently released first."""
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} pages with {self.num_free} free")
        take = min(n, len(self._free))
        pages = self._free[len(self._free) - take:][::-1]
        del self._free[len(self._free) - take:]
        pages += [self.cache.evict() for _ in range(n - take)]
        for p in pages:
            self.refcount[p] = 1
        return pages

    def share(self, pages: list[int]) -> None:
        """One more holder of each of these (cached) pages."""
        for p in pages:
            if self.refcount[p] == 0:
                self.cache.unpark(p)
            self.refcount[p] += 1

    def free(self, pages: list[int]) -> None:
        """One holder fewer of each page. The last page goes first, so that of a cached chain the
        tail is evicted before the head (a chain is found from its head)."""
        for p in reversed(pages):
            assert self.refcount[p] > 0, f"page {p} freed more often than held"
            self.refcount[p] -= 1
            if self.refcount[p]:
                continue
            if self.cache is not None and self.cache.is_cached(p):
                self.cache.park(p)
            else:
                self._free.append(p)
