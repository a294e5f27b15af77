"""OFFLOAD_GATEWAY_ASYNCIO_DEBUG: every uvicorn worker's own loop runs in debug mode, and the
callback that held it is logged (the asyncio logger, through our formatter)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.conftest import Captured, wait_until
from tests.gateway.conftest import TEST_PROTO_MODULES


def test_every_worker_turns_debug_mode_on(shared_compute, gateway_factory):
    gateway = gateway_factory(shared_compute.address, workers=2, asyncio_debug=True, slow_callback_seconds=0.05)

    def workers_in_debug_mode() -> set[int]:
        lines = [json.loads(line) for line in gateway.log_text().splitlines() if line.startswith("{")]
        return {r["pid"] for r in lines if r["msg"].startswith("asyncio debug mode on") and r["process"] == "gateway"}

    wait_until(lambda: len(workers_in_debug_mode()) == 2, 10, message="both workers in asyncio debug mode")
    assert gateway.proc.pid not in workers_in_debug_mode(), "the workers' loops, not the launcher's"


def a_distinctively_named_blocking_call() -> None:
    time.sleep(0.2)  # blocks the worker's loop, on purpose


def test_the_lifespan_sets_it_on_the_running_loop(tmp_path):
    settings = GatewaySettings(
        compute_address=f"unix:{tmp_path / 'absent.sock'}", extra_proto_modules=TEST_PROTO_MODULES,
        asyncio_debug=True, slow_callback_seconds=0.05, _env_file=None,
    )
    app = create_app(settings)
    captured = Captured()
    logging.getLogger("asyncio").addHandler(captured)

    async def serve_lifespan() -> bool:
        inbox: asyncio.Queue[dict] = asyncio.Queue()
        sent: list[dict] = []

        async def send(message: dict) -> None:
            sent.append(message)

        await inbox.put({"type": "lifespan.startup"})
        lifespan = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, inbox.get, send))
        while not any(m["type"] == "lifespan.startup.complete" for m in sent):
            assert not lifespan.done(), sent
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        debug = loop.get_debug() and loop.slow_callback_duration == 0.05
        loop.call_soon(a_distinctively_named_blocking_call)
        await asyncio.sleep(0.3)
        await inbox.put({"type": "lifespan.shutdown"})
        await lifespan
        return debug

    try:
        assert asyncio.run(serve_lifespan())
    finally:
        logging.getLogger("asyncio").removeHandler(captured)
    slow = [r.getMessage() for r in captured.records if r.getMessage().startswith("Executing ")]
    assert any("a_distinctively_named_blocking_call" in message for message in slow), slow
