"""Counts XLA compilations inside a `with` block: the engine's "no compile after warm-up" guard."""

from __future__ import annotations

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """`with counter:` counts backend compiles that happen inside the block (any thread)."""

    def __init__(self, strict: bool = False):
        self.count = 0
        self.strict = strict

    def _listener(self, event: str, duration: float, **kwargs) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self) -> "CompileCounter":
        self._before = self.count
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)
        if self.strict and self.count > self._before and exc[0] is None:
            raise RuntimeError(
                f"{self.count - self._before} XLA compilation(s) after warm-up; every executable "
                "must be built at start-up")
