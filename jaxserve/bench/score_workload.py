"""The multiple-choice scoring job (`--workload=score`): how lm-evaluation-harness scores a
multiple-choice task, built from seeded random token ids (no tokenizer, no data set).

A task has a few few-shot prefixes; every item is one prefix plus the item's own question (the
context), scored against each of its choices (the continuations). So the pairs share context at
two levels: every item of a prefix shares the prefix, and the choices of an item share the whole
context. That sharing is what a prefix cache can use, and the only thing this job measures; the
token ids themselves are random (the bench model's weights are random too).
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Random streams under one seed: the job itself and the warm-up job (whose tokens must share
# nothing with the job's, or the warm-up would fill the cache for the timed run).
JOB_STREAM, WARMUP_STREAM = 0, 1


@dataclasses.dataclass(frozen=True)
class ScoreJob:
    """The job's shape. Defaults: issue 12's multiple-choice-shaped job (512 pairs)."""

    num_prefixes: int = 4  # few-shot prefixes; item i uses prefix i % num_prefixes
    prefix_len: int = 384
    num_items: int = 128
    question_len: tuple[int, int] = (16, 48)  # each item's question: uniform in [lo, hi]
    num_choices: int = 4
    continuation_len: tuple[int, int] = (1, 12)  # each choice: uniform in [lo, hi]

    def __post_init__(self):
        for name in ("num_prefixes", "prefix_len", "num_items", "num_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 1")
        for name, least in (("question_len", 0), ("continuation_len", 1)):
            r = getattr(self, name)
            if len(r) != 2 or not least <= r[0] <= r[1]:
                raise ValueError(f"{name}={r!r} must be (lo, hi) with {least} <= lo <= hi")

    @property
    def num_pairs(self) -> int:
        return self.num_items * self.num_choices

    @property
    def max_len(self) -> int:
        """The longest context + continuation the job can hold."""
        return self.prefix_len + self.question_len[1] + self.continuation_len[1]


@dataclasses.dataclass(frozen=True)
class ScorePair:
    """One (context, continuation) request: choice `choice` of item `item`."""

    id: str
    item: int
    choice: int
    prefix: int  # which few-shot prefix the context starts with
    context: list[int]
    continuation: list[int]


def multiple_choice(job: ScoreJob, vocab_size: int, seed: int, stream: int = JOB_STREAM
                    ) -> list[ScorePair]:
    """The job's pairs, item by item and each item's choices in order (as lm-eval lists them)."""
    rng = np.random.default_rng([seed, stream])
    prefixes = rng.integers(0, vocab_size, size=(job.num_prefixes, job.prefix_len)).tolist()
    pairs = []
    for i in range(job.num_items):
        q_len = int(rng.integers(job.question_len[0], job.question_len[1] + 1))
        context = prefixes[i % job.num_prefixes] + rng.integers(0, vocab_size, q_len).tolist()
        for c in range(job.num_choices):
            n = int(rng.integers(job.continuation_len[0], job.continuation_len[1] + 1))
            pairs.append(ScorePair(f"item{i}-choice{c}", i, c, i % job.num_prefixes,
                                   list(context), rng.integers(0, vocab_size, n).tolist()))
    return pairs


def warmup_job(job: ScoreJob) -> ScoreJob:
    """A small job of the same kind (two items of one prefix, two choices each) for warm-ups."""
    return dataclasses.replace(job, num_prefixes=1, num_items=2, num_choices=2)


def distinct_tokens(sequences: list[list[int]]) -> int:
    """How many nodes the sequences' prefix trie has: the fewest token positions any engine
    must compute to score them all, if it shared every common prefix exactly."""
    root: dict = {}
    n = 0
    for seq in sequences:
        node = root
        for t in seq:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                n += 1
            node = nxt
    return n


def describe(job: ScoreJob, pairs: list[ScorePair]) -> dict:
    """The job's shape and token counts (the report's "job")."""
    seqs = [p.context + p.continuation for p in pairs]
    q = [len(pairs[k].context) - job.prefix_len for k in range(0, len(pairs), job.num_choices)]
    c = [len(p.continuation) for p in pairs]
    return {**dataclasses.asdict(job), "num_pairs": len(pairs),
            "question_len_mean": float(np.mean(q)), "continuation_len_mean": float(np.mean(c)),
            "tokens": sum(map(len, seqs)), "scored_tokens": sum(c),
            "distinct_tokens": distinct_tokens(seqs),
            "longest": max(map(len, seqs))}
