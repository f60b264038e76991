"""Invariant (property) tests of the scheduler and page allocator: no jax anywhere."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given, settings, strategies as st

from jaxserve.config import EngineConfig
from jaxserve.page_allocator import TRASH_PAGE
from jaxserve.scheduler import Scheduler, Sequence, SeqStatus, chunk_starts


def _check_pages(s: Scheduler) -> None:
    held = [p for seq in s.running for p in seq.pages]
    assert len(held) == len(set(held)), "a page is held by two live sequences"
    assert TRASH_PAGE not in held
    free = s.allocator._free
    assert not set(free) & set(held), "a page is both free and held"
    assert len(free) + len(held) == s.cfg.num_pages - 1, "a page leaked"
    for seq in s.waiting:
        assert not seq.pages and seq.num_computed == 0


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
                       max_model_len=max_len).resolve(_model(max_len))
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
            assert starts[-1] + lengths[-1] <= region
            assert all(st_ % cfg.chunk_align == 0 for st_ in starts)
        if cfg.chunk_size == 0:  # unchunked: a prompt is computed whole or not at all
            assert all(c.start == 0 and c.samples for c in out.chunks)
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
        s.add(Sequence(str(i), list(range(60)), arrival_index=i))
    out = s.schedule()
    assert [c.length for c in out.chunks] == [60] * 8
    assert all(c.samples for c in out.chunks)
    assert chunk_starts([60] * 8, 8) == [0, 64, 128, 192, 256, 320, 384, 448]


def test_one_long_prompt_takes_the_whole_budget_and_shares_the_rest():
    cfg = EngineConfig(chunk_size=64, max_chunk_seqs=4, chunk_align=8, max_decode_slots=4,
                       page_size=8, max_model_len=256).resolve(_model(256))
    s = Scheduler(cfg)
    s.add(Sequence("long", list(range(150)), arrival_index=0))
    s.add(Sequence("short", list(range(10)), arrival_index=1))
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
    assert out.stdout.strip() == "['jaxserve', 'jaxserve.config', 'jaxserve.page_allocator', 'jaxserve.scheduler']"


def test_unchunked_mode_prefills_whole_prompt():
    cfg = EngineConfig(chunk_size=0, max_decode_slots=2, page_size=4,
                       max_model_len=32, num_pages=20).resolve(_model(32))
    s = Scheduler(cfg)
    s.add(Sequence("a", list(range(25)), arrival_index=0))
    out = s.schedule()
    assert [c.length for c in out.chunks] == [25] and out.chunks[0].samples
