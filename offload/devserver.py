"""`python -m offload.devserver`: `make dev` for people who edit the code.

Runs compute and the gateway as the Procfile does (`python -m compute`, `python -m gateway`),
prefixes their output like honcho, and watches the code (watchfiles, what uvicorn's --reload
uses):

- a change under `protos/` regenerates the code (offload.protogen, as `make protos`), then
  restarts compute and the gateway (its routes come from the protos); a proto that does not
  compile leaves both running as they were, with protoc's message;
- a change under `compute/` restarts compute; the gateway stays up and reconnects by itself
  (its calls answer 503 meanwhile, and GETs are retried);
- a change under `gateway/` restarts the gateway (all its workers);
- a change under `offload/` (shared by both) restarts both;
- a change in a directory of PYTHONPATH (your own operations) restarts both.

A process that exits by itself is restarted with backoff (0.5 s, doubling up to 10 s; reset
once it has stayed up 30 s), where honcho would have stopped everything. Ctrl-C (SIGINT) or
SIGTERM stops both and exits. Production start-up stays the Procfile's.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from watchfiles import Change, DefaultFilter, awatch

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ("offload/v1", "offload/testing", "buf")
STOP_SECONDS = 15.0  # SIGTERM, then SIGKILL: compute drains for up to its drain grace
BACKOFF_FIRST, BACKOFF_MAX, BACKOFF_RESET = 0.5, 10.0, 30.0
LINE_LIMIT = 1 << 20  # longest output line read whole (asyncio's default is 64 KiB)


class CodeFilter(DefaultFilter):
    """Python and proto sources, not generated code, caches or the venv."""

    def __call__(self, change: Change, path: str) -> bool:
        if not path.endswith((".py", ".proto")) or not super().__call__(change, path):
            return False
        try:
            relative = Path(path).resolve().relative_to(ROOT).as_posix()
        except ValueError:
            return True  # a PYTHONPATH directory of the user's
        return not relative.startswith(GENERATED) and not relative.startswith(".venv")


class Child:
    """One supervised process. `start()` once; `restart()` on a code change; `supervise()`
    restarts it with backoff when it exits by itself; `stop()` at the end (idempotent)."""

    def __init__(self, name: str, argv: list[str], colour: int) -> None:
        self.name, self.argv = name, argv
        self.prefix = f"\x1b[{colour}m{name:8}|\x1b[0m " if _colour() else f"{name:8}| "
        self.proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._stopping = False
        self._replaced = asyncio.Event()  # set while no restart() is under way
        self._replaced.set()
        self._backoff = BACKOFF_FIRST
        self._started_at = 0.0

    async def start(self) -> None:
        self._started_at = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, limit=LINE_LIMIT
        )
        say(f"{self.name} started (pid {self.proc.pid})")
        self._pump = asyncio.create_task(self._copy_output(self.proc))

    async def restart(self, why: str) -> None:
        say(f"{why}: restarting {self.name}")
        self._replaced.clear()
        try:
            await self._terminate()
            if not self._stopping:  # Ctrl-C while it was stopping: no new process
                await self.start()
        finally:
            self._replaced.set()

    async def stop(self) -> None:
        self._stopping = True
        await self._terminate()

    async def supervise(self) -> None:
        while not self._stopping:
            proc = self.proc
            assert proc is not None
            code = await proc.wait()
            await self._replaced.wait()  # a restart() in progress starts the next one itself
            if self._stopping:
                return
            if proc is not self.proc:
                continue  # replaced on purpose: watch the new one
            if time.monotonic() - self._started_at > BACKOFF_RESET:
                self._backoff = BACKOFF_FIRST
            say(f"{self.name} exited with {code}; restarting in {self._backoff:g} s")
            await asyncio.sleep(self._backoff)
            self._backoff = min(BACKOFF_MAX, self._backoff * 2)
            if not self._stopping and proc is self.proc:
                await self.start()

    async def _terminate(self) -> None:
        """SIGTERM and wait (SIGKILL after STOP_SECONDS); its output copied to the end."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_SECONDS)
            except TimeoutError:
                say(f"{self.name} did not stop in {STOP_SECONDS:g} s: killed")
                proc.kill()
                await proc.wait()
        if self._pump is not None:
            await self._pump

    async def _copy_output(self, proc: asyncio.subprocess.Process) -> None:
        """Until the process closes its output; never stops reading early (a child blocked on a
        full pipe would freeze), whatever its lines are like."""
        assert proc.stdout is not None
        while True:
            try:
                line = await proc.stdout.readline()
            except ValueError:  # a line longer than LINE_LIMIT: pass on what is buffered
                line = await proc.stdout.read(LINE_LIMIT)
            if not line:
                return
            text = line.decode(errors="replace")
            sys.stdout.write(f"{_clock()} {self.prefix}{text if text.endswith(chr(10)) else text + chr(10)}")
            sys.stdout.flush()


class DevServer:
    def __init__(self, python: str = sys.executable) -> None:
        self.python = python
        self.compute = Child("compute", [python, "-m", "compute"], 36)
        self.gateway = Child("gateway", [python, "-m", "gateway"], 33)
        self.user_dirs = [Path(p).resolve() for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).is_dir()]

    async def run(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await self.compute.start()
        await self.gateway.start()
        tasks = [
            asyncio.create_task(self.compute.supervise()),
            asyncio.create_task(self.gateway.supervise()),
            asyncio.create_task(self._watch(stop)),
        ]
        await stop.wait()
        say("stopping")
        tasks[2].cancel()  # no restart for a change seen from now on
        await asyncio.gather(self.gateway.stop(), self.compute.stop())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        paths = [ROOT / "protos", ROOT / "compute", ROOT / "gateway", ROOT / "offload", *self.user_dirs]
        async for changes in awatch(*[p for p in paths if p.exists()], watch_filter=CodeFilter(), stop_event=stop):
            await self.changed({Path(path).resolve() for _, path in changes})

    async def changed(self, paths: set[Path]) -> None:
        parts = {_area(path) for path in paths}
        shown = ", ".join(sorted(_shown(p) for p in paths)[:3]) + (" ..." if len(paths) > 3 else "")
        if "protos" in parts:
            if not await self._generate():
                return
            parts |= {"compute", "gateway"}
        if parts & {"offload", "user"}:
            parts |= {"compute", "gateway"}
        if "compute" in parts:
            await self.compute.restart(f"{shown} changed")
        if "gateway" in parts:
            await self.gateway.restart(f"{shown} changed")

    async def _generate(self) -> bool:
        say("protos changed: regenerating")
        proc = await asyncio.create_subprocess_exec(
            self.python, "-m", "offload.protogen", "protos", "--out", ".", cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        if proc.returncode != 0:
            say(f"code generation failed; compute and gateway keep running the previous code:\n{output.decode(errors='replace')}")
            return False
        (ROOT / "offload" / "v1" / ".generated").touch()  # make's stamp: nothing to redo
        return True


def _area(path: Path) -> str:
    try:
        return path.relative_to(ROOT).parts[0]
    except ValueError:
        return "user"


def _shown(path: Path) -> str:
    try:
        return path.relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


def _colour() -> bool:
    return not os.environ.get("NO_COLOR") and (sys.stdout.isatty() or bool(os.environ.get("FORCE_COLOR")))


def say(message: str) -> None:
    sys.stdout.write(f"{_clock()} {'dev':8}| {message}\n")
    sys.stdout.flush()


def main() -> int:
    asyncio.run(DevServer().run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
