"""jaxserve-score: log-likelihoods over a JSONL file (offline evaluation).

  jaxserve-score                                        # the demo model on a few built-in lines
  jaxserve-score --model=DIR --input=in.jsonl --output=out.jsonl

Each input line is one of
  {"context": ..., "continuation": ...}   two strings, or two token-id lists: the continuation's
                                          log-likelihood after the context (`LLM.score`);
  {"text": ...}                           a string or a token-id list: the whole document's, in
                                          windows when it is long (`LLM.score_rolling`);
optionally with an "id", copied to the output. Each output line answers one input line:
  {"line", "loglik", "is_greedy", "num_tokens", "token_logprobs"}   for a pair,
  {"line", "loglik", "num_tokens", "num_windows"}                   for a text,
  {"line", "error"}                                                 for a bad line,
plus "input_sha1", the input line's fingerprint, which a resumed run checks. Tokenization and
windows are `jaxserve.scoring`'s. Lines are written as they complete, in input order; a bad line
(bad JSON or UTF-8, an empty continuation, a pair longer than max_model_len - 1 tokens) is
reported with its line number and skipped; Ctrl-C / SIGTERM write what is finished and exit
130 / 143, and rerunning with the same --output resumes (the machinery is jaxserve-generate's,
`cli/line_runner.py`). Flags and input are checked before the model loads (exit 2).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from absl import app, flags

from jaxserve import scoring
from jaxserve.cli import flags as jflags
from jaxserve.cli import line_runner, output_file
from jaxserve.cli.line_runner import LineJob, Signals
from jaxserve.cli.prompt_file import decode_line, read_lines
from jaxserve.jsonl import parse_object
from jaxserve.metrics import format_table

flags.DEFINE_string("input", None, "JSONL file of {context, continuation} or {text} lines "
                    "(default: a few built-in demo lines).")
flags.DEFINE_string("output", None, "JSONL output file (default: print the records). If it "
                    "exists, the run resumes: lines it already answers are skipped.")
flags.DEFINE_boolean("allow_nonfinite_weights", False,
                     "Load weights that hold NaN or Inf (debugging only; refused by default).")
jflags.define_engine_flags()
FLAGS = flags.FLAGS

PROGRAM = "jaxserve-score"
DEMO_LINES = [
    {"context": "def add(a, b):\n    return", "continuation": " a + b"},
    {"context": "def add(a, b):\n    return", "continuation": " a * b"},
    {"text": "import os\nimport sys\n\n\ndef main():\n    print(sys.argv)\n"},
]


@dataclasses.dataclass(frozen=True)
class ScoreLine:
    number: int  # 1-based line number in the file
    sha1: str  # fingerprint of the raw line, for resuming
    id: object  # the line's "id", or None
    windows: list[scoring.Window]
    pair: tuple[list[int], list[int]] | None  # (context, continuation) ids; None for a text
    token_ids: list[int]  # a text's tokens; for a pair, the continuation's


@dataclasses.dataclass(frozen=True)
class Model:
    """What parsing needs to know of the model, all of it known before it loads."""

    tokenizer: object
    prefix: int | None
    vocab_size: int
    max_model_len: int


def parse_line(number: int, raw: bytes | str, model: Model) -> ScoreLine:
    """One input line -> its windows, or a ValueError that says what is wrong with it."""
    obj = parse_object(decode_line(raw))
    sha1 = hashlib.sha1(raw if isinstance(raw, bytes) else raw.encode()).hexdigest()[:16]
    unknown = sorted(set(obj) - {"context", "continuation", "text", "id"})
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}: give \"context\" and \"continuation\", "
                         f"or \"text\"")
    has_pair = "context" in obj or "continuation" in obj
    if has_pair == ("text" in obj):
        raise ValueError('give "context" and "continuation", or "text"')
    if has_pair:
        if not ("context" in obj and "continuation" in obj):
            missing = "continuation" if "context" in obj else "context"
            raise ValueError(f'"{missing}" is missing')
        ctx, cont = scoring.encode_pair("", (obj["context"], obj["continuation"]),
                                        model.tokenizer, model.prefix, model.vocab_size)
        window = scoring.pair_window("", ctx, cont, model.max_model_len)
        return ScoreLine(number, sha1, obj.get("id"), [window], (ctx, cont), cont)
    ids = scoring.encode_document('"text"', obj["text"], model.tokenizer, model.vocab_size)
    windows = scoring.rolling_windows(ids, model.prefix, model.max_model_len)
    return ScoreLine(number, sha1, obj.get("id"), windows, None, ids)


def parse_lines(lines: list[bytes | str], model: Model
                ) -> tuple[list[ScoreLine], dict[int, str]]:
    """The good lines and {line number: error} for the bad ones (blank lines skipped)."""
    good, errors = [], {}
    for number, raw in enumerate(lines, start=1):
        try:
            if not decode_line(raw).strip():
                continue
            good.append(parse_line(number, raw, model))
        except (ValueError, TypeError) as e:
            errors[number] = str(e)
    return good, errors


def record(line: ScoreLine, outs) -> dict:
    rec = {"line": line.number, "input_sha1": line.sha1}
    if line.id is not None:
        rec["id"] = line.id
    try:
        if line.pair is not None:
            s = scoring.pair_output(outs[0], line.windows[0], *line.pair)
            rec.update(loglik=s.loglik, is_greedy=s.is_greedy,
                       num_tokens=len(s.token_logprobs), token_logprobs=s.token_logprobs)
        else:
            r = scoring.rolling_output(outs, line.windows, line.token_ids)
            rec.update(loglik=r.loglik, num_tokens=r.num_tokens, num_windows=r.num_windows)
    except Exception as e:  # noqa: BLE001 - a request the engine failed: this line's error
        rec["error"] = str(e)
    return rec


def _print_record(rec: dict) -> None:
    print(json.dumps(rec, ensure_ascii=False))


def _prepare():
    """Everything that can be checked before the model loads: flags, input, earlier output."""
    from jaxserve.config import ModelConfig
    from jaxserve.llm import DEMO_MODEL_PATH
    from jaxserve.tokenizer import Tokenizer

    if FLAGS.output and os.path.isdir(FLAGS.output):
        raise ValueError(f"--output={FLAGS.output!r} is a directory")
    raw = ([json.dumps(d).encode() for d in DEMO_LINES] if FLAGS.input is None
           else read_lines(FLAGS.input, "--input"))
    path = FLAGS.model or DEMO_MODEL_PATH
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--model={path!r}: no such folder")
    model_cfg = ModelConfig.from_pretrained(path)
    cfg = jflags.checked_engine_config(FLAGS, model_cfg).resolve(model_cfg)
    tokenizer = (Tokenizer.from_pretrained(path)
                 if os.path.isfile(os.path.join(path, "tokenizer.json")) else None)
    model = Model(tokenizer, scoring.prefix_token_id(tokenizer, model_cfg.eos_token_ids),
                  model_cfg.vocab_size, cfg.max_model_len)
    lines, errors = parse_lines(raw, model)
    done = {}
    if FLAGS.output:
        done = output_file.read_done(FLAGS.output, raw, {ln.number: ln.sha1 for ln in lines},
                                     key="input_sha1", input_flag="--input")
    return lines, errors, done


def main(argv) -> None:
    del argv
    line_runner.main_with_signals(PROGRAM, _main)


def _main(signals: Signals) -> None:
    plan = line_runner.start(PROGRAM, FLAGS, _prepare)
    if plan is None:
        return
    t0 = time.perf_counter()
    hits = plan.llm.engine.stats["prefix_cache_hit_tokens"]
    records = []

    def job(line: ScoreLine) -> LineJob:
        def finish(outs) -> dict:
            records.append(record(line, outs))
            return records[-1]
        return LineJob(line.number, [(w.token_ids, scoring.window_params(w), None)
                                     for w in line.windows], finish)

    line_runner.run_jobs(PROGRAM, plan.llm.engine, [job(ln) for ln in plan.todo],
                         plan.new_errors, output=FLAGS.output, signals=signals,
                         num_done=plan.num_done, desc="score", emit=_print_record)
    wall = time.perf_counter() - t0
    print(_summary(records, plan.todo, wall, plan.llm.engine.stats, plan.num_errors,
                   cached=plan.llm.engine.stats["prefix_cache_hit_tokens"] - hits))


def _summary(records: list[dict], todo: list[ScoreLine], wall: float, stats: dict,
             num_errors: int, cached: int) -> str:
    good = [r for r in records if "error" not in r]
    tokens = sum(len(w.token_ids) for ln in todo for w in ln.windows)
    rows = [
        ("Lines scored", f"{len(good)}"),
        ("Pairs", f"{sum('is_greedy' in r for r in good)}"),
        ("Texts", f"{sum('num_windows' in r for r in good)}"),
        ("Bad lines skipped", f"{num_errors}"),
        ("Failed in the engine", f"{len(records) - len(good)}"),
        ("Tokens scored", f"{sum(r['num_tokens'] for r in good)}"),
        ("Tokens (from the prefix cache)", f"{tokens} ({cached})"),
        ("Wall time (s)", f"{wall:.2f}"),
        ("Tokens/s", f"{tokens / wall if wall > 0 else 0.0:.1f}"),
        *line_runner.engine_rows(stats),
    ]
    return format_table(rows, f" {PROGRAM} ")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    run()
