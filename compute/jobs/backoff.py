"""Retry delays for what is retried in the background: jobs after a worker crash, webhook
deliveries after a failed attempt. Exponential, with full jitter, and an attempt cap."""

from __future__ import annotations

import random


class Backoff:
    """After the n-th failed attempt, wait uniform(0, min(ceiling, base * 2 ** (n - 1))) seconds
    (full jitter: retries of many failures spread out instead of arriving together), unless
    `max_attempts` are spent."""

    def __init__(self, max_attempts: int, base: float, ceiling: float) -> None:
        self.max_attempts, self.base, self.ceiling = max_attempts, base, ceiling

    def delay(self, attempts: int) -> float | None:
        """Seconds before the next attempt after `attempts` failed ones; None: give up."""
        if attempts >= self.max_attempts:
            return None
        return random.uniform(0.0, min(self.ceiling, self.base * 2 ** min(max(attempts - 1, 0), 60)))
