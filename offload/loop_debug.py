"""asyncio's debug mode on a running loop: the switch to try first when the heartbeat reports stalls.

In debug mode asyncio (and uvloop) time every callback and log
`Executing <Handle ...> took 0.503 seconds` for each one slower than `slow_callback_duration`,
naming the coroutine or callback, where it was created included. The heartbeat says *that*
the loop was blocked and shows the stack at that moment; these lines say *which* callback held it, even
for blocks shorter than the stall threshold. They come from the `asyncio` logger, which
propagates to the root logger, so they go to the same log as everything else, through our
formatter.

Debug mode costs CPU on every callback (timing, coroutine origin tracking): it is a
diagnostic switch, off by default. Identical in compute and in each gateway worker.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("offload.loop_debug")


def enable(loop: asyncio.AbstractEventLoop, slow_callback_seconds: float) -> None:
    """Turn on debug mode for `loop`, logging callbacks slower than `slow_callback_seconds`."""
    loop.set_debug(True)
    loop.slow_callback_duration = slow_callback_seconds
    # Debug mode logs through the `asyncio` logger: it must not be quieter than WARNING.
    asyncio_logger = logging.getLogger("asyncio")
    if asyncio_logger.getEffectiveLevel() > logging.WARNING:
        asyncio_logger.setLevel(logging.WARNING)
    log.warning(
        "asyncio debug mode on: slow callbacks are logged (costs CPU on every callback)",
        extra={"slow_callback_seconds": slow_callback_seconds},
    )
