"""Host side of the step contract: a `SchedulerOutput` becomes the numpy arrays of a `StepBatch`.

Plain numpy, no device work: the engine hands the result to the compiled step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.attention import AttentionShape
from jaxserve.request import Request
from jaxserve.scheduler import SchedulerOutput, Sequence
from jaxserve.step import StepBatch, example_batch


PENDING = -1  # an output token sampled by the step in flight, not yet back on the host


@dataclasses.dataclass(frozen=True)
class Sampled:
    index: int  # the sequence's index in the step's per-sequence outputs
    global_index: int  # index into the step's `next_tokens`
    seq: Sequence
    out_index: int  # where the token goes in seq.output_ids


@dataclasses.dataclass(frozen=True)
class ChunkRows:
    """A chunk's rows in the packed region, to read its prompt logprobs back."""

    seq: Sequence
    first_row: int
    first_position: int
    length: int


@dataclasses.dataclass
class SlotPlan:
    """What each sequence of a built batch means, to read its outputs back."""

    sampled: list[Sampled]
    chunk_rows: list[ChunkRows]  # only chunks whose prompt logprobs were asked for


def build_batch(out: SchedulerOutput, shape: AttentionShape, global_chunk_seqs: int
                ) -> tuple[StepBatch, SlotPlan]:
    """Packs the scheduled work into a batch of `shape`. A decode whose input token is still
    PENDING reads it on device from the previous step's `next_tokens` (`prev_index`), where
    chunk sequence i is i and decode slot d is `global_chunk_seqs` + d in every executable."""
    b, sc, d = shape.chunk_tokens, shape.max_chunk_seqs, shape.num_decode_slots
    ps = shape.page_size
    assert len(out.chunks) <= sc and len(out.decodes) <= d, (len(out.chunks), len(out.decodes))
    batch = example_batch(shape)
    sp = batch.sampling
    sampled: list[Sampled] = []
    chunk_rows: list[ChunkRows] = []

    def fill(i: int, row0: int, seq: Sequence, start: int, length: int, samples: bool):
        pages = np.asarray(seq.pages, np.int32)
        pos = np.arange(start, start + length, dtype=np.int32)
        rows = slice(row0, row0 + length)
        toks = [seq.token_at(int(p)) for p in pos]
        if toks[-1] == PENDING:
            assert length == 1, "only a decode can start from a token still in flight"
            batch.prev_index[row0] = seq.payload.pending_global_slot
            toks[-1] = 0
        batch.token_ids[rows] = toks
        batch.positions[rows] = pos
        batch.slot_mapping[rows] = pages[pos // ps] * ps + pos % ps
        batch.q_starts[i], batch.q_lens[i] = row0, length
        batch.kv_lens[i] = start + length
        batch.page_table[i, : len(pages)] = pages
        batch.sample_index[i] = row0 + length - 1
        if samples:
            req: Request = seq.payload
            global_index = i if i < sc else global_chunk_seqs + i - sc
            sampled.append(Sampled(i, global_index, seq, len(seq.output_ids)))
            prm = req.params
            sp.temperature[i], sp.top_k[i] = prm.temperature, prm.top_k
            sp.top_p[i], sp.min_p[i] = prm.top_p, prm.min_p
            sp.seeds[i], sp.gen_index[i] = req.seed, len(seq.output_ids)

    assert out.chunk_rows <= b, (out.chunk_starts, b)
    for i, (work, row0) in enumerate(zip(out.chunks, out.chunk_starts)):
        seq = work.seq
        fill(i, row0, seq, work.start, work.length, work.samples)
        req: Request = seq.payload
        if req.wants_prompt_logprobs:
            # Row r predicts position start + r + 1: a target where that position is asked for.
            first, n_prompt = req.params.prompt_logprobs_start, len(seq.prompt_ids)
            nxt = range(work.start + 1, work.start + work.length + 1)
            targets = [seq.prompt_ids[j] if first <= j < n_prompt else -1 for j in nxt]
            if max(targets) >= 0:
                batch.prompt_targets[row0: row0 + work.length] = targets
                chunk_rows.append(ChunkRows(seq, row0, work.start, work.length))
    # Unused decode slots keep q_starts at their row (q_lens 0), as the layout says.
    batch.q_starts[sc:] = b + np.arange(d, dtype=np.int32)
    # Longest contexts first: the reference attention buckets decode slots in groups.
    decodes = sorted(out.decodes, key=lambda q: -q.num_computed)
    for j, seq in enumerate(decodes):
        fill(sc + j, b + j, seq, seq.num_computed, 1, True)

    want_top = any(x.seq.payload.params.logprobs for x in sampled)
    live = np.array([0, out.chunk_rows, b, b + len(decodes)], np.int32)
    batch = dataclasses.replace(batch, want_top_logprobs=np.bool_(want_top),
                                any_samples=np.bool_(bool(sampled)), live_rows=live)
    return batch, SlotPlan(sampled=sampled, chunk_rows=chunk_rows)
