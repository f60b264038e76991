"""The JSONL output of jaxserve-generate and jaxserve-score: written as results complete, so no
finished work is lost, and read back to resume an interrupted run.

Every record carries `"line": N`, the input line it answers (bad lines too, as
`{"line": N, "error": "..."}`), which is what makes resuming safe: a rerun with the same
`--output` skips the lines that already have a record. Records go out in input order; one that
completes early waits in memory for the lines before it, except when the run is interrupted,
when everything finished is written at once (a later complete run puts the file back in order).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Iterable

FSYNC_EVERY_S = 5.0


def read_done(path: str, input_lines: list[bytes], expected: dict[int, object],
              key: str = "prompt", input_flag: str = "--prompts") -> dict[int, dict]:
    """{line number: record} of an earlier run's `path` (nothing if it does not exist).

    A last line cut short (the run was killed while writing it) is removed from the file, so its
    input line runs again. A record that names no input line, or whose `key` field (when it has
    one, not None) differs from `expected[line]` (the input line's prompt, or its fingerprint),
    means the file belongs to another input: a ValueError says so.
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(cut)
        data = data[:cut]
    done: dict[int, dict] = {}
    for i, raw in enumerate(data.splitlines(), start=1):
        where = f"--output={path!r} line {i}"
        try:
            rec = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{where} is not JSON: not an output of this program? (move it "
                             f"away to start afresh)") from None
        n = rec.get("line") if isinstance(rec, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= len(input_lines):
            raise ValueError(f"{where} names no line of the input ({n!r}); it was written for "
                             f"another {input_flag} file (move it away to start afresh)")
        if n in done:
            raise ValueError(f"{where} repeats input line {n}")
        if rec.get(key) is not None and n in expected and rec[key] != expected[n]:
            raise ValueError(f"{where}: its {key} differs from input line {n}'s; it was "
                             f"written for another {input_flag} file (move it away to start "
                             f"afresh)")
        done[n] = rec
    return done


class OrderedWriter:
    """Writes records in line order as they complete; `emit` prints them instead when there is
    no file (`path=None`)."""

    def __init__(self, path: str | None, expected: Iterable[int],
                 emit: Callable[[dict], None] | None = None, enabled: bool = True):
        self.path, self.enabled = path, enabled
        self._order = sorted(expected)
        self._next = 0  # index in _order of the next line to write
        self._ready: dict[int, dict] = {}
        self._emit = emit
        self._file = open(path, "a", encoding="utf-8") if path and enabled else None
        self._last_sync = time.monotonic()
        self.written = 0
        self.out_of_order = False

    def add(self, rec: dict) -> None:
        self._ready[rec["line"]] = rec
        while self._next < len(self._order) and self._order[self._next] in self._ready:
            self._write(self._ready.pop(self._order[self._next]))
            self._next += 1
        self._sync(force=False)

    def flush_all(self) -> None:
        """Writes every finished record now, in order among themselves (on interruption)."""
        if self._ready:
            self.out_of_order = True
        for n in sorted(self._ready):
            self._write(self._ready.pop(n))
        self._sync(force=True)

    def close(self) -> None:
        self.flush_all()
        if self._file is not None:
            self._file.close()
            self._file = None

    def _write(self, rec: dict) -> None:
        self.written += 1
        if not self.enabled:
            return
        if self._file is not None:
            self._file.write(json.dumps(rec, ensure_ascii=False) + "\n")
        elif self._emit is not None:
            self._emit(rec)

    def _sync(self, force: bool) -> None:
        if self._file is None:
            sys.stdout.flush()
            return
        self._file.flush()
        now = time.monotonic()
        if force or now - self._last_sync >= FSYNC_EVERY_S:
            os.fsync(self._file.fileno())
            self._last_sync = now


def sort_file(path: str) -> None:
    """Rewrites `path` with its records in line order (atomically: a temporary file, renamed)."""
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    lines.sort(key=lambda raw: json.loads(raw)["line"])
    tmp = f"{path}.sorting"
    with open(tmp, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_sorted(path: str) -> bool:
    with open(path, "rb") as f:
        numbers = [json.loads(raw)["line"] for raw in f.read().splitlines()]
    return numbers == sorted(numbers)
