"""Host side of the step contract: a `SchedulerOutput` becomes the numpy arrays of a `StepBatch`.

Plain numpy, no device work: the engine hands the result to the compiled step.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.attention import AttentionShape
from jaxserve.request import Request
from jaxserve.scheduler import Sequence, SchedulerOutput
from jaxserve.step import StepBatch, example_batch
from jaxserve.sampling import SamplingInputs


PENDING = -1  # an output token sampled by the step in flight, not yet back on the host


@dataclasses.dataclass(frozen=True)
class Sampled:
    slot: int  # row of the step's per-slot outputs
    global_slot: int  # index into the step's `next_tokens`
    seq: Sequence
    out_index: int  # where the token goes in seq.output_ids


@dataclasses.dataclass
class SlotPlan:
    """What each slot of a built batch means, to read its outputs back."""

    sampled: list[Sampled]
    chunk_rows: list[tuple[Sequence, int, int, int]]  # (seq, first row, first position, length)


def build_batch(out: SchedulerOutput, shape: AttentionShape, num_global_slots: int
                ) -> tuple[StepBatch, SlotPlan]:
    """Lays the scheduled work out in slots. A decode whose input token is still PENDING reads it
    on device from the previous step's `next_tokens` (`prev_index`)."""
    c, p, d = shape.num_chunk_slots, shape.chunk_len, shape.num_decode_slots
    first_global = num_global_slots - (c + d)
    ps = shape.page_size
    assert len(out.chunks) <= c and len(out.decodes) <= d, (len(out.chunks), len(out.decodes))
    b = example_batch(shape)
    token_ids, prev_index = b.token_ids, b.prev_index
    positions, slot_mapping = b.positions, b.slot_mapping
    kv_lens, page_table, sample_index = b.kv_lens, b.page_table, b.sample_index
    s = b.sampling
    temperature, top_k, top_p, min_p, seeds, gen_index = (
        s.temperature, s.top_k, s.top_p, s.min_p, s.seeds, s.gen_index)
    chunk_lens, targets = b.chunk_lens, b.prompt_targets
    sampled: list[Sampled] = []
    chunk_rows = []
    want_prompt = False

    def fill(slot: int, row0: int, seq: Sequence, start: int, length: int, samples: bool):
        pages = np.asarray(seq.pages, np.int32)
        pos = np.arange(start, start + length, dtype=np.int32)
        rows = slice(row0, row0 + length)
        toks = [seq.token_at(int(i)) for i in pos]
        if toks[-1] == PENDING:
            assert length == 1, "only a decode can start from a token still in flight"
            prev_index[row0] = seq.payload.pending_global_slot
            toks[-1] = 0
        token_ids[rows] = toks
        positions[rows] = pos
        slot_mapping[rows] = pages[pos // ps] * ps + pos % ps
        kv_lens[slot] = start + length
        page_table[slot, : len(pages)] = pages
        sample_index[slot] = row0 + length - 1
        if samples:
            req: Request = seq.payload
            sampled.append(Sampled(slot, first_global + slot, seq, len(seq.output_ids)))
            prm = req.params
            temperature[slot], top_k[slot] = prm.temperature, prm.top_k
            top_p[slot], min_p[slot] = prm.top_p, prm.min_p
            seeds[slot], gen_index[slot] = req.seed, len(seq.output_ids)

    for i, work in enumerate(out.chunks):
        seq = work.seq
        fill(i, i * p, seq, work.start, work.length, work.samples)
        chunk_lens[i] = work.length
        req: Request = seq.payload
        if req.wants_prompt_logprobs:
            n_prompt = len(seq.prompt_ids)
            nxt = np.arange(work.start + 1, work.start + work.length + 1)
            has = nxt < n_prompt
            targets[i * p: i * p + work.length] = np.where(
                has, [seq.prompt_ids[j] if j < n_prompt else -1 for j in nxt], -1)
            want_prompt |= bool(has.any())
            chunk_rows.append((seq, i * p, work.start, work.length))
    # Longest contexts first: the reference attention buckets decode slots in groups.
    decodes = sorted(out.decodes, key=lambda q: -q.num_computed)
    for j, seq in enumerate(decodes):
        fill(c + j, c * p + j, seq, seq.num_computed, 1, True)

    want_top = any(x.seq.payload.params.logprobs for x in sampled)
    batch = dataclasses.replace(b, want_prompt_logprobs=np.bool_(want_prompt),
                                want_top_logprobs=np.bool_(want_top))
    return batch, SlotPlan(sampled=sampled, chunk_rows=chunk_rows)
