"""Random step batches in the engine's layout, for the kernel tests and the benchmark.

Every page no sequence owns, and every slot of a sequence's last page past its kv_len, is NaN
(so are padding query rows): a kernel that reads past the end or lets padding leak shows it.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from pallas_kernels.ragged import ragged_reference, to_ragged


@dataclasses.dataclass
class StepCase:
    q: np.ndarray  # [T, H, Dh], T = B + D
    k_pages: np.ndarray  # [N, page_size, KVH, Dh]
    v_pages: np.ndarray
    positions: np.ndarray  # i32[T]
    q_starts: np.ndarray  # i32[Sc + D]
    q_lens: np.ndarray  # i32[Sc + D]
    kv_lens: np.ndarray  # i32[Sc + D]
    page_table: np.ndarray  # i32[Sc + D, pages_per_seq]
    live_rows: np.ndarray  # bool[T]
    chunk_tokens: int  # B
    max_chunk_seqs: int  # Sc

    def kwargs(self):
        return dict(positions=self.positions, q_starts=self.q_starts, q_lens=self.q_lens,
                    kv_lens=self.kv_lens, page_table=self.page_table)


def make_step_case(rng: np.random.Generator, *, chunks: list[tuple[int, int]],
                   decodes: list[int], page_size: int, pages_per_seq: int, num_heads: int,
                   num_kv_heads: int, head_dim: int, dtype=np.float32,
                   num_pages: int | None = None, chunk_align: int = 1,
                   chunk_tokens: int | None = None, chunk_len: int | None = None) -> StepCase:
    """chunks: (chunk tokens, kv_len after the step) per chunk sequence, (0, 0) = an unused
    one; decodes: kv_len per decode slot, 0 = empty. Chunks are packed back to back in the
    chunk region, each starting at a multiple of `chunk_align`; with `chunk_len`, chunk i starts
    at row i * chunk_len instead (fixed slots: a special case of packing). `chunk_tokens`: rows
    of the region (default: just enough; padding rows after the last chunk are allowed)."""
    sc, d = len(chunks), len(decodes)
    starts, row = [], 0
    for i, (n, _) in enumerate(chunks):
        row = i * chunk_len if chunk_len else -(-row // chunk_align) * chunk_align
        starts.append(row)
        row += n
    end = sc * chunk_len if chunk_len else -(-row // chunk_align) * chunk_align
    b = chunk_tokens if chunk_tokens is not None else end
    assert b >= row and b % chunk_align == 0, (b, row, chunk_align)
    t, s = b + d, sc + d
    slot_lens = [kv for _, kv in chunks] + list(decodes)
    need = sum(-(-kv // page_size) for kv in slot_lens)
    num_pages = num_pages or need + 3
    assert num_pages >= need + 1, (num_pages, need)
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pages = np.full(shape, np.nan, np.float32)
    v_pages = np.full(shape, np.nan, np.float32)
    free = list(rng.permutation(np.arange(1, num_pages)))  # page 0 is the trash page
    page_table = np.zeros((s, pages_per_seq), np.int32)
    for slot, kv in enumerate(slot_lens):
        n = -(-kv // page_size)
        assert n <= pages_per_seq, (kv, pages_per_seq, page_size)
        for i in range(n):
            page = free.pop()
            page_table[slot, i] = page
            valid = min(page_size, kv - i * page_size)
            k_pages[page, :valid] = rng.standard_normal((valid, num_kv_heads, head_dim))
            v_pages[page, :valid] = rng.standard_normal((valid, num_kv_heads, head_dim))
    q = np.full((t, num_heads, head_dim), np.nan, np.float32)
    positions = np.zeros(t, np.int32)
    live = np.zeros(t, bool)
    q_starts = np.zeros(s, np.int32)
    q_lens = np.zeros(s, np.int32)
    for i, ((n, kv), start) in enumerate(zip(chunks, starts)):
        assert n <= kv and (n > 0) == (kv > 0), (n, kv)
        assert not chunk_len or n <= chunk_len, (n, chunk_len)
        q_starts[i], q_lens[i] = start, n
        rows = slice(start, start + n)
        q[rows] = rng.standard_normal((n, num_heads, head_dim))
        positions[rows] = np.arange(kv - n, kv)
        live[rows] = True
    for i, kv in enumerate(decodes):
        row = b + i
        q_starts[sc + i] = row
        if kv:
            q_lens[sc + i] = 1
            q[row] = rng.standard_normal((num_heads, head_dim))
            positions[row] = kv - 1
            live[row] = True
    kv_lens = np.asarray(slot_lens, np.int32)
    return StepCase(q=q.astype(dtype), k_pages=k_pages.astype(dtype),
                    v_pages=v_pages.astype(dtype), positions=positions, q_starts=q_starts,
                    q_lens=q_lens, kv_lens=kv_lens, page_table=page_table, live_rows=live,
                    chunk_tokens=b, max_chunk_seqs=sc)


def ragged_oracle(chunk_tokens: int, max_chunk_seqs: int, num_decode_slots: int):
    """attend(q, k_pages, v_pages, **case.kwargs()) in the step layout through the dense
    per-row `ragged_reference`: the oracle that checks the step-layout backends (the XLA
    reference included) on packed cases."""
    b, sc, d = chunk_tokens, max_chunk_seqs, num_decode_slots

    def attend(q, k_pages, v_pages, **kw):
        meta, rows = to_ragged(b, sc, d, kw["q_starts"], kw["q_lens"], kw["kv_lens"],
                               kw["page_table"])
        o = ragged_reference(q[rows.src_rows], k_pages, v_pages, meta,
                             sm_scale=1 / np.sqrt(q.shape[-1]))
        return o[rows.dst_rows]

    return attend
