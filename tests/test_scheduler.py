"""Invariant (property) tests of the scheduler and page allocator: no jax anywhere."""

from __future__ import annotations

import collections
import subprocess
import sys

from hypothesis import given, settings, strategies as st

from jaxserve.config import EngineConfig
from jaxserve.page_allocator import TRASH_PAGE
from jaxserve.prefix_cache import page_hash
from jaxserve.scheduler import Scheduler, Sequence, SeqStatus, chunk_starts


def _check_pages(s: Scheduler) -> None:
    """Every page is exactly one of: free, cached and held by nobody, or held; reference counts
    are the number of live holders; a page named in the cache holds that content for each
    holder (its chain hash recomputed here from the holder's own tokens)."""
    a, cache = s.allocator, s.cache
    holders = collections.Counter(p for seq in s.running for p in seq.pages)
    assert TRASH_PAGE not in holders
    for seq in s.running:
        assert len(set(seq.pages)) == len(seq.pages), "a sequence holds a page twice"
    free = set(a._free)
    parked = set(cache.lru) if cache else set()
    assert len(free) == len(a._free)
    assert not free & parked and not free & set(holders) and not parked & set(holders)
    assert len(free) + len(parked) + len(holders) == s.cfg.num_pages - 1, "a page leaked"
    for p in range(1, s.cfg.num_pages):
        assert a.refcount[p] == holders[p], f"page {p}: refcount {a.refcount[p]} != holders"
    if cache is None:
        assert max(holders.values(), default=1) == 1, "a page shared with caching off"
    else:
        assert all(cache.is_cached(p) for p in parked)
        assert {cache.page_of[h]: h for h in cache.page_of} == cache.hash_of
        for seq in s.running:
            for i, page in enumerate(seq.pages):
                if holders[page] > 1 or cache.is_cached(page):
                    # Shared or named: a full, computed page of exactly this holder's content.
                    assert (i + 1) * s.cfg.page_size <= seq.num_computed
                    assert cache.hash_of[page] == chain_hash(seq, i, s.cfg.page_size)
    for seq in s.waiting:
        assert not seq.pages and seq.num_computed == 0


def chain_hash(seq: Sequence, i: int, page_size: int) -> bytes:
    h = None
    for j in range(i + 1):
        h = page_hash(h, [seq.token_at(p) for p in range(j * page_size, (j + 1) * page_size)],
                      seq.cache_salt)
    return h


workloads = st.fixed_dictionaries({
    "chunk_size": st.sampled_from([0, 1, 3, 8, 12, 16]),
    "max_chunk_seqs": st.integers(1, 4),
    "chunk_align": st.sampled_from([1, 2, 4]),
    "max_decode_slots": st.integers(1, 4),
    "page_size": st.sampled_from([1, 2, 4]),
    "extra_pages": st.integers(0, 12),
    "requests": st.lists(st.tuples(st.integers(1, 30), st.integers(1, 8), st.integers(0, 3)),
                         min_size=1, max_size=12),
    "finish_seed": st.integers(0, 2**16),
    "caching": st.booleans(),  # the prompts below share prefixes (0, 1, 2, ...)
})


@settings(max_examples=150, deadline=None)
@given(workloads)
def test_scheduler_invariants(w):
    max_len = 40
    pages_per_seq = -(-max_len // w["page_size"])
    align = w["chunk_align"] if w["chunk_size"] % w["chunk_align"] == 0 else 1
    cfg = EngineConfig(chunk_size=w["chunk_size"], max_chunk_seqs=w["max_chunk_seqs"],
                       chunk_align=align, max_decode_slots=w["max_decode_slots"],
                       page_size=w["page_size"], num_pages=1 + pages_per_seq + w["extra_pages"],
                       max_model_len=max_len, enable_prefix_caching=w["caching"]
                       ).resolve(_model(max_len))
    s = Scheduler(cfg)
    region = cfg.chunk_tokens
    pending = sorted(enumerate(w["requests"]), key=lambda r: r[1][2])  # by arrival step
    seqs, finished = [], []
    step = 0
    while pending or s.has_unfinished():
        while pending and pending[0][1][2] <= step:
            i, (prompt_len, max_out, _) = pending.pop(0)
            seq = Sequence(str(i), list(range(prompt_len)), arrival_index=i, payload=max_out)
            seqs.append(seq)
            s.add(seq)
        decodable_before = {id(q) for q in s.running if q.remaining == 1}
        out = s.schedule()
        step += 1
        assert step < 2000, "no progress"
        # Budget: at most Sc chunks, packed (aligned) within the region; D decodes.
        assert len(out.chunks) <= cfg.max_chunk_seqs
        assert len(out.decodes) <= cfg.max_decode_slots
        assert all(c.length >= 1 for c in out.chunks)
        lengths = [c.length for c in out.chunks]
        if lengths:
            starts = chunk_starts(lengths, cfg.chunk_align)
            # The decode rows are the chunks' when no decode shares the step.
            rows = starts[-1] + lengths[-1]
            assert rows <= cfg.chunk_rows_beside(len(out.decodes))
            # Never more rows than the step's budget, whatever shares it.
            assert rows + len(out.decodes) <= region + cfg.max_decode_slots
            assert all(st_ % cfg.chunk_align == 0 for st_ in starts)
        if cfg.chunk_size == 0:  # unchunked: a prompt is computed whole or not at all
            assert all(c.samples for c in out.chunks)
        # Decode first: every running sequence ready to decode, and not preempted, decodes.
        preempted = {id(q) for q in out.preempted}
        assert {id(q) for q in out.decodes} >= decodable_before - preempted
        scheduled = [c.seq for c in out.chunks] + out.decodes
        assert len({id(q) for q in scheduled}) == len(scheduled)
        for q in scheduled:
            assert q.status == SeqStatus.RUNNING
        for c in out.chunks:
            assert c.start == c.seq.num_computed
            assert len(c.seq.pages) * cfg.page_size >= c.start + c.length
        _check_pages(s)
        # Run the "step": advance, sample, finish some.
        for c in out.chunks:
            c.seq.num_computed += c.length
        for q in out.decodes:
            q.num_computed += 1
        for q in [c.seq for c in out.chunks if c.samples] + out.decodes:
            q.output_ids.append(0)
            if len(q.output_ids) >= q.payload or q.num_tokens >= max_len:
                s.finish(q)
                finished.append(q.request_id)
        _check_pages(s)
    assert sorted(finished) == sorted(q.request_id for q in seqs)  # each exactly once
    assert s.allocator.num_free == cfg.num_pages - 1
    assert not any(s.allocator.refcount)


def _model(max_len):
    from jaxserve.config import ModelConfig
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=8,
                       intermediate_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                       head_dim=8, max_position_embeddings=max_len)


def test_short_prompts_share_one_step():
    # Eight 60-token prompts and a 512-token budget: one step, not eight.
    cfg = EngineConfig(chunk_size=512, max_chunk_seqs=8, chunk_align=8, max_decode_slots=16,
                       page_size=16, max_model_len=256).resolve(_model(256))
    s = Scheduler(cfg)
    for i in range(8):
        s.add(Sequence(str(i), [i] + list(range(59)), arrival_index=i))  # no shared page
    out = s.schedule()
    assert [c.length for c in out.chunks] == [60] * 8
    assert all(c.samples for c in out.chunks)
    assert chunk_starts([60] * 8, 8) == [0, 64, 128, 192, 256, 320, 384, 448]


def test_requests_sharing_a_prefix_wait_for_its_pages_instead_of_computing_them():
    # Items sharing a 40-token context (5 full pages of 8), arriving together: the first
    # computes the shared pages; the others wait a step for them (later arrivals that share
    # nothing go ahead meanwhile), then are admitted with the pages as hits.
    cfg = EngineConfig(chunk_size=64, max_chunk_seqs=4, chunk_align=8, max_decode_slots=8,
                       page_size=8, max_model_len=256).resolve(_model(256))
    s = Scheduler(cfg)
    shared = list(range(40))
    for i in range(3):
        s.add(Sequence(f"choice{i}", shared + [50 + i], arrival_index=i))
    s.add(Sequence("other", [60] * 40, arrival_index=3))
    first = s.schedule()
    assert [c.seq.request_id for c in first.chunks] == ["choice0", "other"]
    assert first.hit_tokens == 0
    for c in first.chunks:
        c.seq.num_computed += c.length
        c.seq.output_ids.append(1)
    second = s.schedule()
    # Admitted with the 5 pages as hits, their one remaining token as a decode.
    assert [q.request_id for q in second.decodes] == ["choice0", "choice1", "choice2"]
    assert [c.seq.request_id for c in second.chunks] == ["other"]  # the rest of its prompt
    assert second.hit_tokens == 2 * 40 and not s.waiting
    # Without the cache nobody waits: all four are admitted at once.
    cfg_off = EngineConfig(chunk_size=64, max_chunk_seqs=4, chunk_align=8, max_decode_slots=8,
                           page_size=8, max_model_len=256,
                           enable_prefix_caching=False).resolve(_model(256))
    s = Scheduler(cfg_off)
    for i in range(3):
        s.add(Sequence(f"choice{i}", shared + [50 + i], arrival_index=i))
    # 41 + 24 (to row 72: 64 + the 8 decode rows, as no decode shares the step), in order.
    assert [c.length for c in s.schedule().chunks] == [41, 24]


def test_idle_decode_rows_go_to_the_chunks():
    cfg = EngineConfig(chunk_size=64, max_chunk_seqs=4, chunk_align=8, max_decode_slots=16,
                       page_size=8, max_model_len=256).resolve(_model(256))
    assert [cfg.chunk_rows_beside(n) for n in (0, 1, 8, 9, 16)] == [80, 72, 72, 64, 64]
    assert cfg.wide_chunk_regions == ((80, 0), (72, 8))
    s = Scheduler(cfg)
    s.add(Sequence("long", list(range(200)), arrival_index=0))
    out = s.schedule()
    assert [c.length for c in out.chunks] == [80] and not out.decodes  # alone: 64 + 16 rows
    s.running[0].num_computed += 80
    # A one-token prompt (a decode) arriving now: the long prompt gives back the rows the
    # decode needs (a decode region of 8 rows: 72 chunk rows), so nobody waits for it.
    s.add(Sequence("one", [7], arrival_index=1))
    out = s.schedule()
    assert [c.length for c in out.chunks] == [72] and not out.chunks[0].samples
    assert [q.request_id for q in out.decodes] == ["one"] and not s.waiting
    long = s.running[0]
    long.num_computed = 160  # 40 left: they fit beside the decode
    s.running[1].num_computed, s.running[1].output_ids = 1, [5]
    out = s.schedule()
    assert [c.length for c in out.chunks] == [40]
    assert [q.request_id for q in out.decodes] == ["one"]
    for q in s.running:  # both computed, each with a token sampled: two decodes next
        q.num_computed = q.num_tokens
        q.output_ids.append(1)
    s.add(Sequence("long2", list(range(300, 500)), arrival_index=2))
    out = s.schedule()  # beside 2 decodes (a decode region of 8 rows): 64 + 8 chunk rows
    assert len(out.decodes) == 2 and [c.length for c in out.chunks] == [72]


def test_one_long_prompt_takes_the_whole_budget_and_shares_the_rest():
    cfg = EngineConfig(chunk_size=64, max_chunk_seqs=4, chunk_align=8, max_decode_slots=4,
                       page_size=8, max_model_len=256).resolve(_model(256))
    s = Scheduler(cfg)
    s.add(Sequence("long", list(range(150)), arrival_index=0))
    s.add(Sequence("short", list(range(100, 110)), arrival_index=1))
    assert [c.length for c in s.schedule().chunks] == [64]  # the long one takes it all
    for c in s.running:
        c.num_computed += 64
    out = s.schedule()
    assert [c.length for c in out.chunks] == [64]
    s.running[0].num_computed += 64
    out = s.schedule()  # 22 left of the long one: the short one packs in after it (row 24)
    assert [(c.seq.request_id, c.length) for c in out.chunks] == [("long", 22), ("short", 10)]
    assert chunk_starts([22, 10], 8) == [0, 24]


def test_scheduler_imports_no_jax():
    code = "import sys, jaxserve.scheduler; print(sorted(m for m in sys.modules if m.startswith('jax')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(['jaxserve', 'jaxserve.config', 'jaxserve.page_allocator',
                                      'jaxserve.prefix_cache', 'jaxserve.scheduler'])


def test_unchunked_mode_prefills_whole_prompt():
    cfg = EngineConfig(chunk_size=0, max_decode_slots=2, page_size=4,
                       max_model_len=32, num_pages=20).resolve(_model(32))
    s = Scheduler(cfg)
    s.add(Sequence("a", list(range(25)), arrival_index=0))
    out = s.schedule()
    assert [c.length for c in out.chunks] == [25] and out.chunks[0].samples


# -- prefix caching: random mixes of shared prefixes, aborts and preemptions -------------------

PENDING = -1  # as the engine marks an output token still in flight (batching.PENDING)

cache_workloads = st.fixed_dictionaries({
    "chunk_size": st.sampled_from([0, 3, 8, 16]),
    "max_chunk_seqs": st.integers(1, 3),
    "max_decode_slots": st.integers(1, 4),
    "page_size": st.sampled_from([1, 2, 4]),
    "extra_pages": st.integers(0, 10),
    # (base prefix, its length used, own tail length, max outputs, arrival step)
    "requests": st.lists(st.tuples(st.integers(0, 2), st.integers(0, 24), st.integers(0, 6),
                                   st.integers(1, 8), st.integers(0, 6)),
                         min_size=1, max_size=10),
    "aborts": st.lists(st.tuples(st.integers(0, 40), st.integers(0, 9)), max_size=4),
    "salted": st.booleans(),
    "caps": st.lists(st.sampled_from([None, None, 0, 3, 9]), min_size=10, max_size=10),
})


def _next_token(seq: Sequence) -> int:
    # Deterministic in the sequence's tokens, so identical prompts generate identical pages.
    return sum(seq.token_at(p) for p in range(seq.num_tokens)) * 7 % 5


@settings(max_examples=1500, deadline=None)
@given(cache_workloads)
def test_prefix_cache_invariants(w):
    """Pages are shared only with identical content, none leaks, refcounts are exact, cached
    pages are evicted least recently released first, and a full hit computes the last token.
    `content` is the oracle: for every page slot, which (sequence, position) wrote its K/V; a
    step may read a slot only if the writer's tokens up to it equal the reader's."""
    max_len = 40
    ps = w["page_size"]
    cfg = EngineConfig(chunk_size=w["chunk_size"], max_chunk_seqs=w["max_chunk_seqs"],
                       chunk_align=1, max_decode_slots=w["max_decode_slots"], page_size=ps,
                       num_pages=1 + -(-max_len // ps) + w["extra_pages"],
                       max_model_len=max_len).resolve(_model(max_len))
    s = Scheduler(cfg)
    lru_checks = _check_lru_evictions(s)
    bases = [[(b * 31 + i * 7) % 50 for i in range(30)] for b in range(3)]
    content: dict[tuple[int, int], tuple[Sequence, int]] = {}

    def prefix(seq, pos):
        return [seq.token_at(p) for p in range(pos + 1)]

    pending = sorted(enumerate(w["requests"]), key=lambda r: r[1][4])
    aborts = sorted(w["aborts"])
    seqs, finished, in_flight = [], [], []
    step = hits = 0
    while pending or s.has_unfinished():
        while pending and pending[0][1][4] <= step:
            i, (b, n, tail, max_out, _) = pending.pop(0)
            prompt = bases[b][:n] + [50 + i] * tail or [1]
            prompt = prompt[: max_len - 1]
            seq = Sequence(str(i), prompt, arrival_index=i, payload=max_out,
                           cache_salt=b % 2 if w["salted"] else None,
                           max_cached_tokens=w["caps"][i])
            seqs.append(seq)
            s.add(seq)
        waiting_before = {id(q) for q in s.waiting}
        out = s.schedule()
        step += 1
        assert step < 3000, "no progress"
        _check_pages(s)
        for seq, start, length in ([(c.seq, c.start, c.length) for c in out.chunks]
                                   + [(q, q.num_computed, 1) for q in out.decodes]):
            assert start == seq.num_computed and 1 <= length and start + length <= seq.num_tokens
            if id(seq) in waiting_before:
                hits += start
                # A hit is whole pages, short of the last token (its logits are needed).
                assert start % ps == 0 and start <= seq.num_tokens - 1
                assert seq.max_cached_tokens is None or start <= seq.max_cached_tokens
            for pos in range(start):  # read: what is there is this sequence's own prefix
                writer, wpos = content[seq.pages[pos // ps], pos % ps]
                assert wpos == pos and prefix(writer, pos) == prefix(seq, pos), (
                    f"{seq.request_id} reads {writer.request_id}'s K/V at {pos}")
            for pos in range(start, start + length):  # written: held by this sequence alone
                page = seq.pages[pos // ps]
                assert s.allocator.refcount[page] == 1 and not (s.cache.is_cached(page))
                content[page, pos % ps] = (seq, pos)
        # "Launch": advance, mark sampled tokens in flight, stop at the length limit.
        for c in out.chunks:
            c.seq.num_computed += c.length
        for q in out.decodes:
            q.num_computed += 1
        launched = []
        for q in [c.seq for c in out.chunks if c.samples] + out.decodes:
            q.output_ids.append(PENDING)
            launched.append((q, len(q.output_ids) - 1))
            if len(q.output_ids) >= q.payload or q.num_tokens >= max_len:
                s.finish(q)
                finished.append(q.request_id)
        # "Collect" the previous step's tokens, then abort some requests.
        for q, k in in_flight:
            q.output_ids[k] = _next_token_before(q, k)
        in_flight = launched
        while aborts and aborts[0][0] <= step:
            _, k = aborts.pop(0)
            live = [q for q in seqs if q.status != SeqStatus.FINISHED]
            if live:
                victim = live[k % len(live)]
                s.finish(victim)
                finished.append(victim.request_id)
        _check_pages(s)
    assert sorted(finished) == sorted(q.request_id for q in seqs)  # each exactly once
    assert s.allocator.num_free == cfg.num_pages - 1 and not any(s.allocator.refcount)
    STATS["hits"] += hits
    STATS["evictions"] += lru_checks[0]
    STATS["examples"] += 1


def _next_token_before(seq: Sequence, k: int) -> int:
    """The token sampled at output index k: a function of the tokens before it."""
    n = len(seq.prompt_ids) + k
    return sum(seq.token_at(p) for p in range(n)) * 7 % 5


STATS = collections.Counter()


def _check_lru_evictions(s: Scheduler) -> list[int]:
    """Wraps the allocator so every allocation that evicts is checked to take the least
    recently released cached pages, in order; returns [evictions seen]."""
    a, seen = s.allocator, [0]
    allocate = a.allocate

    def checked(n):
        lru, free = list(a.cache.lru), len(a._free)
        pages = allocate(n)
        evicted = pages[free:] if n > free else []
        assert evicted == lru[: len(evicted)], "evicted out of LRU order"
        assert all(not a.cache.is_cached(p) for p in pages)
        seen[0] += len(evicted)
        return pages
    a.allocate = checked
    return seen


def test_prefix_cache_property_test_exercised_hits_and_evictions():
    if not STATS["examples"]:
        import pytest
        pytest.skip("runs after test_prefix_cache_invariants")
    assert STATS["hits"] > 1000 and STATS["evictions"] > 100, STATS


def _cfg(**kw):
    base = dict(chunk_size=16, max_chunk_seqs=4, chunk_align=1, max_decode_slots=4, page_size=4,
                max_model_len=40)
    base.update(kw)
    return EngineConfig(**base).resolve(_model(40))


def _run_to_end(s: Scheduler, seq: Sequence, n_out: int = 1) -> None:
    """Computes `seq` (alone) through `n_out` sampled tokens, then finishes it."""
    s.add(seq)
    while True:
        out = s.schedule()
        for c in out.chunks:
            c.seq.num_computed += c.length
        for q in out.decodes:
            q.num_computed += 1
        if any(c.samples for c in out.chunks) or out.decodes:
            seq.output_ids.append(9)
            if len(seq.output_ids) == n_out:
                s.finish(seq)
                return


def test_a_second_identical_prompt_hits_all_but_the_last_token():
    s = Scheduler(_cfg())
    _run_to_end(s, Sequence("a", list(range(13)), arrival_index=0))
    assert s.allocator.num_cached == 3  # 12 of 13 tokens in full pages (+1 generated: no)
    again = Sequence("b", list(range(13)), arrival_index=1)
    s.add(again)
    out = s.schedule()  # one token left: it rides as a decode, which samples
    assert not out.chunks and out.decodes == [again] and again.num_computed == 12
    assert out.hit_tokens == 12 and out.query_tokens == 13
    # A prompt of exactly whole pages: the last page is recomputed (its last token is needed).
    s2 = Scheduler(_cfg())
    _run_to_end(s2, Sequence("a", list(range(12)), arrival_index=0))
    s2.add(Sequence("b", list(range(12)), arrival_index=1))
    out = s2.schedule()
    assert [(c.start, c.length) for c in out.chunks] == [(8, 4)] and not out.decodes
    s3 = Scheduler(_cfg())
    _run_to_end(s3, Sequence("a", list(range(12)), arrival_index=0), n_out=2)
    s3.add(Sequence("b", list(range(6)), arrival_index=1))  # a shorter prompt: 1 page hit
    out = s3.schedule()
    assert [(c.start, c.length) for c in out.chunks] == [(4, 2)]


def test_generated_tokens_are_cached_and_salt_separates():
    s = Scheduler(_cfg())
    _run_to_end(s, Sequence("a", list(range(6)), arrival_index=0), n_out=4)  # 6 + 3 computed
    cont = Sequence("b", list(range(6)) + [9, 9, 9, 5], arrival_index=1)
    s.add(cont)
    assert s.schedule().chunks[0].start == 8  # prompt page and the page ending in output
    s.finish(cont)
    salted = Sequence("c", list(range(6)) + [9, 9, 9, 5], arrival_index=2,
                      cache_salt="lora-1")
    s.add(salted)
    assert s.schedule().chunks[0].start == 0


def test_prompt_logprob_sequences_compute_everything_but_still_cache():
    s = Scheduler(_cfg())
    _run_to_end(s, Sequence("a", list(range(14)), arrival_index=0, max_cached_tokens=0))
    seq = Sequence("b", list(range(14)), arrival_index=1, max_cached_tokens=0)
    s.add(seq)
    assert s.schedule().chunks[0].start == 0
    s.finish(seq)
    s.add(seq := Sequence("c", list(range(14)), arrival_index=2, max_cached_tokens=11))
    assert s.schedule().chunks[0].start == 8  # a cap below the last token: whole pages under it
    s.finish(seq)
    s.add(Sequence("d", list(range(14)), arrival_index=3))
    assert s.schedule().chunks[0].start == 12


def test_lru_evicts_least_recently_released_and_tails_first():
    s = Scheduler(_cfg(num_pages=12, chunk_size=40))  # 11 usable pages of 4
    _run_to_end(s, Sequence("a", [1] * 9, arrival_index=0))  # pages a0 a1 cached
    _run_to_end(s, Sequence("b", [2] * 9, arrival_index=1))  # b0 b1 cached
    a0, a1 = s.cache.lookup([chain_hash(Sequence("x", [1] * 9, 0), i, 4) for i in range(2)])
    b0, b1 = s.cache.lookup([chain_hash(Sequence("x", [2] * 9, 0), i, 4) for i in range(2)])
    assert list(s.cache.lru) == [a1, a0, b1, b0]  # released in order, tail before head
    assert s.allocator.num_free == 11 and s.allocator.num_cached == 4
    s.add(Sequence("c", [3] * 33, arrival_index=2))  # 9 pages: 7 free + the 2 oldest cached
    s.schedule()
    assert list(s.cache.lru) == [b1, b0] and not s.cache.lookup(
        [chain_hash(Sequence("x", [1] * 9, 0), 0, 4)])


def test_caching_off_shares_nothing():
    s = Scheduler(_cfg(enable_prefix_caching=False))
    _run_to_end(s, Sequence("a", list(range(13)), arrival_index=0))
    assert s.allocator.num_cached == 0 and s.allocator.num_free == s.cfg.num_pages - 1
    s.add(Sequence("b", list(range(13)), arrival_index=1))
    assert s.schedule().chunks[0].start == 0
