"""Stall-free continuous batching with chunked prefill (after Sarathi-Serve). Plain Python.

Each step: (1) every running sequence with exactly one token whose K/V is not yet cached gets a
decode slot; (2) running sequences still prefilling continue into the chunk region; (3) waiting
sequences are admitted in arrival order while the chunk region's token budget, its sequence
count, decode slots and pages last. The chunk region is packed: chunks sit back to back (each
starting at a multiple of `chunk_align` rows) and one sequence may take all that is left; in a
step with fewer decodes than decode slots the region also takes the idle decode rows
(`EngineConfig.chunk_rows_beside`), and gives them back, shortening its last chunk, when a
decode is admitted after it. Pages are
taken lazily, as a sequence grows; when none is left the newest running sequence is preempted
(its pages freed, its prompt and outputs so far recomputed later), so nothing is lost.

A sequence's "remaining" tokens are those whose K/V is not in the cache. After a step it has
exactly one (the token just sampled), so decoding is the case `remaining == 1`, which also covers a
one-token prompt and needs no special state.

Prefix caching (`EngineConfig.enable_prefix_caching`, see `prefix_cache.py`): a full page is named
by its content's hash chain once its K/V has been computed (dispatched: any later step reads it
after it is written) and its tokens are known (an output token still in flight is negative, see
`batching.PENDING`). A waiting sequence is admitted with the longest cached run of its full
pages (shared, reference counts up; `num_computed` starts after them), capped below its last
token, whose logits are needed: a full hit still computes that token. The pages a sequence
writes (past the hit) are its own and never shared. `max_cached_tokens` caps a hit further: a
sequence that asks for prompt logprobs from position p has p - 1 (a cached position produces no
logits); its pages still enter the cache for others. Preemption and finishing release pages
(cached ones stay cached), so a preempted sequence may find its own pages again.

Requests that share a prefix often arrive together (an evaluation's items and choices): the
first computes the shared pages, and admitting the others before those pages are named would
compute them again. So a waiting sequence whose next page a running sequence is computing waits
for it (it lets later arrivals be admitted meanwhile, never past a shortage of pages or room,
which keep strict arrival order); it is admitted with the page as a hit a step or two later.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import math
from collections.abc import Hashable
from typing import Any

from jaxserve.config import EngineConfig
from jaxserve.page_allocator import PageAllocator
from jaxserve.prefix_cache import PageHash, PrefixCache, page_hash


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it."""

    request_id: str
    prompt_ids: list[int]
    arrival_index: int
    payload: Any = None  # the engine's own per-request state; the scheduler never reads it
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V is in the cache
    pages: list[int] = dataclasses.field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    num_preemptions: int = 0
    # Most tokens a prefix-cache hit may cover (None: all but the last). Logits come only from
    # computed rows: row r gives position r + 1's logprob, so 0 for full prompt logprobs.
    max_cached_tokens: int | None = None
    cache_salt: Hashable = None  # anything besides the tokens that changes K/V (none today)
    # Chain hashes of the leading full pages whose tokens are known (tokens never change, so
    # these survive preemption), and how many of `pages` are already named in the cache.
    page_hashes: list[PageHash] = dataclasses.field(default_factory=list)
    num_registered: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed

    def token_at(self, position: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[position] if position < n else self.output_ids[position - n]


@dataclasses.dataclass(frozen=True)
class ChunkWork:
    seq: Sequence
    start: int  # first position computed
    length: int  # tokens computed
    samples: bool  # reaches the sequence's last token, so it samples the next one


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ChunkWork]
    decodes: list[Sequence]
    preempted: list[Sequence]
    # Admissions this step: tokens they looked for in the prefix cache, and tokens found.
    query_tokens: int = 0
    hit_tokens: int = 0
    # The chunk region's layout (`chunk_starts` of the chunks): the first row of each chunk.
    chunk_starts: list[int] = dataclasses.field(default_factory=list)

    @property
    def chunk_rows(self) -> int:
        """Rows of the chunk region the chunks take, alignment gaps included."""
        return self.chunk_starts[-1] + self.chunks[-1].length if self.chunks else 0

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks) + len(self.decodes)

    @property
    def is_empty(self) -> bool:
        return not self.chunks and not self.decodes


def chunk_starts(lengths: list[int], align: int) -> list[int]:
    """Rows where packed chunks of these lengths start: back to back, each at a multiple of
    `align`. The batch builder lays chunks out by this rule and the scheduler budgets by it."""
    starts, row = [], 0
    for n in lengths:
        row = -(-row // align) * align
        starts.append(row)
        row += n
    return starts


class Scheduler:
    def __init__(self, cfg: EngineConfig):
        self.cfg = cfg
        self.cache = PrefixCache() if cfg.enable_prefix_caching else None
        self.allocator = PageAllocator(cfg.num_pages, self.cache)
        self.waiting: list[Sequence] = []  # kept in arrival order
        self.running: list[Sequence] = []  # kept in admission order: the last is the newest

    # -- requests in and out ---------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._insert_waiting(seq)

    def finish(self, seq: Sequence) -> None:
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(chunks=[], decodes=[], preempted=[])
        for seq in self.running:
            self._register(seq)  # what the previous step computed
        for seq in list(self.running):
            if seq.status == SeqStatus.RUNNING and seq.remaining == 1:
                if self._reserve(seq, seq.num_computed + 1, out):
                    out.decodes.append(seq)
        for seq in list(self.running):
            if seq.status == SeqStatus.RUNNING and seq.remaining > 1:
                length = self._chunk_length(seq.remaining, out)
                if length == 0:
                    continue  # a whole unchunked prompt may still fit after a shorter one
                if self._reserve(seq, seq.num_computed + length, out):
                    out.chunks.append(self._chunk(seq, length))
        self._admit(out)
        out.chunk_starts = chunk_starts([c.length for c in out.chunks], self.cfg.chunk_align)
        return out

    def _admit(self, out: SchedulerOutput) -> None:
        if out.preempted:
            return  # the cache is full: admitting now would only preempt again next step
        in_flight = self._pages_in_flight()
        for seq in list(self.waiting):
            if len(self.running) >= self.cfg.max_decode_slots:
                return
            assert not seq.pages and seq.num_computed == 0, "a waiting sequence holds pages"
            hit = self._cached_prefix(seq)
            if self._next_page_in_flight(seq, len(hit), in_flight):
                continue  # take that page from the cache once it is computed
            computed = len(hit) * self.cfg.page_size
            remaining = seq.num_tokens - computed
            is_decode = remaining == 1
            length = 1 if is_decode else self._chunk_length(remaining, out)
            if is_decode and not self._make_decode_room(out):
                length = 0  # the chunks took the decode row it needs: next step
            if length == 0:
                return  # no room in the chunk region this step
            needed = self._pages_for(computed + length) - len(hit)
            # Hit pages nobody holds count as free now, but are taken, not allocated.
            parked = sum(1 for p in hit if self.allocator.refcount[p] == 0)
            if needed + parked > self.allocator.num_free:
                return  # strict arrival order: nobody overtakes the head of the queue
            self.waiting.remove(seq)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.allocator.share(hit)
            seq.pages = hit + self.allocator.allocate(needed)
            seq.num_registered = len(hit)
            seq.num_computed = computed
            out.query_tokens += seq.num_tokens
            out.hit_tokens += computed
            if self.cache is not None:
                in_flight.update(self._unregistered_hashes(seq))
            if is_decode:
                out.decodes.append(seq)
            else:
                out.chunks.append(self._chunk(seq, length))

    # -- helpers -----------------------------------------------------------------------------

    def _make_decode_room(self, out: SchedulerOutput) -> bool:
        """Whether one more decode fits this step. Chunks may have taken the idle decode rows
        it needs (`chunk_rows_beside`); the last chunk then gives them back (it computes those
        tokens next step), so a one-token or fully cached prompt is never held back by a long
        prefill that runs alone."""
        over = self._chunk_rows_used(out) - self.cfg.chunk_rows_beside(len(out.decodes) + 1)
        if over <= 0:
            return True
        last = out.chunks[-1]
        if last.length <= over:
            return False  # a last chunk this short cannot give enough back: next step
        out.chunks[-1] = self._chunk(last.seq, last.length - over)
        return True

    def _chunk_rows_used(self, out: SchedulerOutput) -> int:
        """Rows the chunks scheduled so far take, alignment gaps included."""
        if not out.chunks:
            return 0
        lengths = [c.length for c in out.chunks]
        return chunk_starts(lengths, self.cfg.chunk_align)[-1] + lengths[-1]

    def _chunk_room(self, out: SchedulerOutput) -> int:
        """Rows a further chunk could take this step (0 when the region or its sequence count
        is used up)."""
        if len(out.chunks) >= self.cfg.max_chunk_seqs:
            return 0
        lengths = [c.length for c in out.chunks]
        starts = chunk_starts(lengths + [0], self.cfg.chunk_align)
        # Decode rows the step leaves idle are the chunks' too.
        return max(0, self.cfg.chunk_rows_beside(len(out.decodes)) - starts[-1])

    def _chunk_length(self, remaining: int, out: SchedulerOutput) -> int:
        """Tokens of a sequence with `remaining` to compute in this step's chunk region; 0 =
        none fit."""
        room = self._chunk_room(out)
        if self.cfg.chunk_size == 0:
            # No chunking: the whole rest in one step, or not at all.
            return remaining if remaining <= room else 0
        return min(room, remaining)

    def _chunk(self, seq: Sequence, length: int) -> ChunkWork:
        return ChunkWork(seq=seq, start=seq.num_computed, length=length,
                         samples=seq.num_computed + length == seq.num_tokens)

    def _pages_for(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.cfg.page_size)

    def _reserve(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Gives `seq` pages for `num_tokens`, preempting newer sequences; False if seq itself
        had to be preempted."""
        needed = self._pages_for(num_tokens) - len(seq.pages)
        while needed > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        if needed > 0:
            seq.pages.extend(self.allocator.allocate(needed))
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        if seq in out.decodes:
            out.decodes.remove(seq)
        out.chunks = [c for c in out.chunks if c.seq is not seq]
        self._release(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self._insert_waiting(seq)
        out.preempted.append(seq)

    def _insert_waiting(self, seq: Sequence) -> None:
        keys = [s.arrival_index for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, seq.arrival_index), seq)

    # -- prefix cache --------------------------------------------------------------------------

    def _hashes(self, seq: Sequence, num_pages: int) -> list[PageHash]:
        """The chain hashes of `seq`'s first `num_pages` full pages, or as many as have known
        tokens."""
        ps, hashes = self.cfg.page_size, seq.page_hashes
        while len(hashes) < num_pages:
            i = len(hashes)
            tokens = [seq.token_at(p) for p in range(i * ps, (i + 1) * ps)]
            if min(tokens) < 0:
                break  # a token still in flight
            hashes.append(page_hash(hashes[-1] if hashes else None, tokens, seq.cache_salt))
        return hashes[:num_pages]

    @staticmethod
    def _cacheable_tokens(seq: Sequence) -> int:
        """Most of `seq`'s tokens a prefix-cache hit may cover: all but the last, and no more
        than `max_cached_tokens`."""
        limit = seq.num_tokens - 1
        if seq.max_cached_tokens is not None:
            limit = min(limit, seq.max_cached_tokens)
        return limit

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached pages holding `seq`'s longest cached prefix, short of its last token."""
        limit = self._cacheable_tokens(seq)
        if self.cache is None or limit < self.cfg.page_size:
            return []
        return self.cache.lookup(self._hashes(seq, limit // self.cfg.page_size))

    def _unregistered_hashes(self, seq: Sequence) -> list[PageHash]:
        """Hashes of `seq`'s full pages of known tokens that are not yet named in the cache
        (being computed, or to be)."""
        return self._hashes(seq, seq.num_tokens // self.cfg.page_size)[seq.num_registered:]

    def _pages_in_flight(self) -> set[PageHash]:
        if self.cache is None:
            return set()
        return {h for seq in self.running for h in self._unregistered_hashes(seq)}

    def _next_page_in_flight(self, seq: Sequence, num_hit: int, in_flight: set) -> bool:
        """Whether the page after `seq`'s cached prefix could be a hit but is still being
        computed by a running sequence."""
        if not in_flight:
            return False
        if (num_hit + 1) * self.cfg.page_size > self._cacheable_tokens(seq):
            return False  # no further page could be a hit
        hashes = self._hashes(seq, num_hit + 1)
        return len(hashes) > num_hit and hashes[num_hit] in in_flight

    def _register(self, seq: Sequence) -> None:
        """Names in the cache the pages of `seq` whose K/V is computed and tokens known."""
        if self.cache is None:
            return
        full = min(seq.num_computed // self.cfg.page_size, len(seq.pages))
        hashes = self._hashes(seq, full)
        for i in range(seq.num_registered, len(hashes)):
            self.cache.register(seq.pages[i], hashes[i])
        seq.num_registered = max(seq.num_registered, len(hashes))

    def _release(self, seq: Sequence) -> None:
        """Gives `seq`'s pages back; those whose content is cached stay cached."""
        self._register(seq)
        self.allocator.free(seq.pages)
        seq.pages = []
        seq.num_registered = 0
