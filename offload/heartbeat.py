"""Event-loop heartbeat: a ticker coroutine plus a watchdog thread.

The ticker wakes every `interval` seconds and records how late it woke (loop lag) into a
histogram. The watchdog thread checks the age of the last tick; once it is older than
`stall_threshold`, it captures the loop thread's stack *while the loop is still blocked*
(a monitor running on the loop could only report afterwards, showing itself) and logs one
warning per stall with the duration and the request ids in flight.

Identical in the gateway workers and in compute. Never imports grpc.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger("offload.heartbeat")

LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class LoopStats:
    last_lag_seconds: float
    max_lag_seconds: float  # over the recent window
    stalled: bool
    stalls: int


class Heartbeat:
    """Start with `start()` from inside the running loop (once); stop with `await stop()`."""

    def __init__(
        self,
        *,
        interval: float = 0.05,
        stall_threshold: float = 0.5,
        inflight: Callable[[], Iterable[str]] = tuple,
        registry: CollectorRegistry | None = None,
        window: int = 200,
    ) -> None:
        if interval <= 0 or stall_threshold <= interval:
            raise ValueError("need 0 < interval < stall_threshold")
        self.interval = interval
        self.stall_threshold = stall_threshold
        self._inflight = inflight
        self._recent: collections.deque[float] = collections.deque(maxlen=window)
        self._last_tick = time.monotonic()
        self._last_lag = 0.0
        self._stalls = 0
        self._task: asyncio.Task[None] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._loop_thread_id = 0
        self._lag_histogram = Histogram(
            "offload_loop_lag_seconds",
            "How late the event loop heartbeat woke up.",
            buckets=LAG_BUCKETS,
            registry=registry,
        )
        self._stall_counter = Counter(
            "offload_loop_stalls", "Event loop stalls longer than the threshold.", registry=registry
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Call once, from a coroutine running on the loop to watch."""
        if self._task is not None:
            raise RuntimeError("heartbeat already started")
        self._loop_thread_id = threading.get_ident()
        self._last_tick = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._tick(), name="offload-heartbeat")
        self._thread = threading.Thread(target=self._watch, name="offload-watchdog", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Idempotent."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=1)

    # -- state ----------------------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        return time.monotonic() - self._last_tick > self.stall_threshold

    @property
    def healthy(self) -> bool:
        """False while the loop is stalled or its last wake-up was later than the threshold."""
        return not self.stalled and self._last_lag <= self.stall_threshold

    def stats(self) -> LoopStats:
        return LoopStats(
            last_lag_seconds=self._last_lag,
            max_lag_seconds=max(self._recent, default=0.0),
            stalled=self.stalled,
            stalls=self._stalls,
        )

    # -- internals ------------------------------------------------------------------------

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - expected)
            self._last_lag = lag
            self._recent.append(lag)
            self._lag_histogram.observe(lag)
            self._last_tick = time.monotonic()

    def _watch(self) -> None:
        check_every = min(self.interval, self.stall_threshold / 4)
        stall_started: float | None = None
        while not self._stop.wait(check_every):
            last_tick = self._last_tick
            age = time.monotonic() - last_tick
            if age > self.stall_threshold and stall_started != last_tick:
                # A new stall: report it once, with the stack as it is right now.
                stall_started = last_tick
                self._stalls += 1
                self._stall_counter.inc()
                log.warning(
                    "event loop stalled",
                    extra={
                        "stall_seconds": round(age, 3),
                        "stack": self._loop_stack(),
                        "inflight_request_ids": self._safe_inflight(),
                    },
                )
            elif stall_started is not None and last_tick != stall_started:
                log.info(
                    "event loop recovered",
                    extra={"stall_seconds": round(last_tick - stall_started, 3)},
                )
                stall_started = None

    def _loop_stack(self) -> str:
        frame = sys._current_frames().get(self._loop_thread_id)
        if frame is None:
            return "<loop thread not found>"
        return "".join(traceback.format_stack(frame))

    def _safe_inflight(self) -> list[str]:
        try:
            return list(self._inflight())[:50]
        except Exception:  # the loop thread may be mutating it; the warning matters more
            return []
