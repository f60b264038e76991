"""The host page allocator: hands out KV-cache pages. Plain Python, no jax.

Page 0 is the trash page: padding tokens write their K/V there and no live sequence owns it, so
the step never needs a branch for "is this token real".
"""

from __future__ import annotations

TRASH_PAGE = 0


class PageAllocator:
    """A free list of page ids 1..num_pages-1 (page 0 is never handed out)."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError(f"{num_pages=} must be at least 2 (page 0 is the trash page)")
        self.num_pages = num_pages
        # Pop from the end, so low page ids go first (easier to read in tests and dumps).
        self._free = list(range(num_pages - 1, TRASH_PAGE, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} pages with {len(self._free)} free")
        pages = self._free[len(self._free) - n:][::-1]
        del self._free[len(self._free) - n:]
        return pages

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))
