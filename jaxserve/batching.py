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


@dataclasses.dataclass
class SlotPlan:
    """What each slot of a built batch means, to read its outputs back."""

    slot_seqs: list[Sequence | None]  # per slot: the sequence that samples there, or None
    chunk_rows: list[tuple[Sequence, int, int]]  # (seq, first token row, first position)


def build_batch(out: SchedulerOutput, shape: AttentionShape) -> tuple[StepBatch, SlotPlan]:
    c, p, d = shape.num_chunk_slots, shape.chunk_len, shape.num_decode_slots
    ps = shape.page_size
    assert len(out.chunks) <= c and len(out.decodes) <= d, (len(out.chunks), len(out.decodes))
    b = example_batch(shape)
    token_ids, positions, slot_mapping = b.token_ids, b.positions, b.slot_mapping
    kv_lens, page_table, sample_index = b.kv_lens, b.page_table, b.sample_index
    s = b.sampling
    temperature, top_k, top_p, min_p, seeds, gen_index = (
        s.temperature, s.top_k, s.top_p, s.min_p, s.seeds, s.gen_index)
    chunk_lens, targets = b.chunk_lens, b.prompt_targets
    slot_seqs: list[Sequence | None] = [None] * (c + d)
    chunk_rows = []
    want_prompt = False

    def fill(slot: int, row0: int, seq: Sequence, start: int, length: int, samples: bool):
        pages = np.asarray(seq.pages, np.int32)
        pos = np.arange(start, start + length, dtype=np.int32)
        rows = slice(row0, row0 + length)
        token_ids[rows] = [seq.token_at(int(i)) for i in pos]
        positions[rows] = pos
        slot_mapping[rows] = pages[pos // ps] * ps + pos % ps
        kv_lens[slot] = start + length
        page_table[slot, : len(pages)] = pages
        sample_index[slot] = row0 + length - 1
        if samples:
            req: Request = seq.payload
            slot_seqs[slot] = seq
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
            chunk_rows.append((seq, i * p, work.start))
    for j, seq in enumerate(out.decodes):
        fill(c + j, c * p + j, seq, seq.num_computed, 1, True)

    batch = dataclasses.replace(b, want_prompt_logprobs=np.bool_(want_prompt))
    return batch, SlotPlan(slot_seqs=slot_seqs, chunk_rows=chunk_rows)
