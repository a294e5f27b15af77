"""Operations of offload.testing.v1.TestingService, served only when a test lists this module
in OFFLOAD_COMPUTE_EXTRA_OPERATION_MODULES. Like any module with heavy operations, it must not
import grpc (pool workers import it). Also the proof of the extension model: an RPC in a
proto + one decorated function, and compute serves it with no other change.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import numpy as np

from google.rpc import code_pb2

from compute.errors import ComputeError, InvalidArgument
from compute.registry import heavy, light
from offload.testing.v1 import testing_pb2

SERVICE = "offload.testing.v1.TestingService"
log = logging.getLogger("tests.operations")


@heavy(f"{SERVICE}.Spin")
def spin(request: testing_pb2.SpinRequest, task) -> testing_pb2.SpinResponse:
    """Burn CPU for `seconds`, checking for cancellation about every millisecond."""
    log.info("spin started", extra={"seconds": request.seconds, "worker_pid": os.getpid()})
    end = time.monotonic() + request.seconds
    iterations = 0
    while time.monotonic() < end:
        task.check()
        sum(range(2000))
        iterations += 1
    return testing_pb2.SpinResponse(pid=os.getpid(), iterations=iterations, finished=True)


def spin_together_batch(requests: list[testing_pb2.SpinTogetherRequest], task) -> list:
    """Every member burns CPU until its own `seconds` pass or it leaves (cancel, deadline)."""
    log.info("spin together started", extra={"members": task.size, "worker_pid": os.getpid()})
    started = time.monotonic()
    ends = np.array([started + request.seconds for request in requests])
    results: list = [None] * len(requests)
    while True:
        wanted = task.check()  # raises once every member has left
        running = wanted & np.array([result is None for result in results])
        if not running.any():
            return results
        now = time.monotonic()
        for index in np.flatnonzero(running & (ends <= now)):
            results[index] = testing_pb2.SpinTogetherResponse(
                pid=os.getpid(), batch_size=task.size, members_at_finish=int(running.sum())
            )
        sum(range(2000))


@heavy(f"{SERVICE}.SpinTogether", batch=spin_together_batch)
def spin_together(request: testing_pb2.SpinTogetherRequest, task) -> testing_pb2.SpinTogetherResponse:
    end = time.monotonic() + request.seconds
    while time.monotonic() < end:
        task.check()
        sum(range(2000))
    return testing_pb2.SpinTogetherResponse(pid=os.getpid(), batch_size=1, members_at_finish=1)


@light(f"{SERVICE}.Block")
def block_the_loop_on_purpose(request: testing_pb2.BlockRequest, runtime) -> testing_pb2.BlockResponse:
    time.sleep(request.seconds)  # the mistake the heartbeat watchdog exists to catch
    return testing_pb2.BlockResponse()


@heavy(f"{SERVICE}.Crash")
def crash(request: testing_pb2.CrashRequest, task) -> testing_pb2.CrashResponse:
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")


@light(f"{SERVICE}.Echo")
def echo(request: testing_pb2.EchoRequest, runtime) -> testing_pb2.EchoRequest:
    return request


@light(f"{SERVICE}.Ticks")
async def ticks(request: testing_pb2.TicksRequest, runtime):
    pad = {"pad": "x" * request.pad_bytes} if request.pad_bytes else {}
    for index in range(request.after_index + 1, request.count + 1):
        if request.interval_ms:
            await asyncio.sleep(request.interval_ms / 1000)
        yield testing_pb2.Tick(index=index, **pad)


class _Named(ComputeError):
    pass


@light(f"{SERVICE}.Fail")
def fail(request: testing_pb2.FailRequest, runtime) -> testing_pb2.FailResponse:
    if request.code not in code_pb2.Code.keys() or request.code == "OK":
        raise InvalidArgument("code must be a google.rpc.Code name other than OK")
    error = _Named(f"failed on purpose with {request.code}")
    error.code = request.code
    raise error
