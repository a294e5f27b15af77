"""A table swapped in while serving (LoadTable), with real compute processes and real signals.

Each test starts its own compute. Expected answers are computed here, from the same arrays
(compute.table.synthetic_arrays, the .npy files the tests write), per generation: a response
must equal its generation's answer exactly, whichever generation its trailer names.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from compute.search import top_k
from compute.table import synthetic_arrays
from offload.testing.v1 import testing_pb2, testing_pb2_grpc
from offload.v1 import compute_pb2, compute_pb2_grpc, jobs_pb2, search_pb2
from tests.conftest import ROOT, kill_orphans, metric_sample, wait_until

ROWS, DIM = 20_000, 16
# Deadlines of the calls that must succeed: what they take is this machine's load (the pool
# runs at nice 19), not the swap's doing; a failure within them is a real one.
CALL_TIMEOUT = 60
GENERATION_KEY = "offload-table-generation"


def service(compute) -> compute_pb2_grpc.ComputeServiceStub:
    return compute_pb2_grpc.ComputeServiceStub(compute.channel())


def load(compute, timeout: float = 60, **source) -> compute_pb2.LoadTableResponse:
    return service(compute).LoadTable(compute_pb2.LoadTableRequest(**source), timeout=timeout)


def load_file(compute, path: Path, **options) -> compute_pb2.LoadTableResponse:
    return load(compute, file=compute_pb2.NpyTableSource(vectors_path=str(path)), **options)


def stats_of(compute) -> compute_pb2.Stats:
    return service(compute).GetStats(compute_pb2.GetStatsRequest(), timeout=10)


def stats(compute) -> compute_pb2.CacheStats:
    return stats_of(compute).cache


def segments(compute) -> list[str]:
    return sorted(p.name for p in compute.shm_dir.iterdir())


def generations_in_shm(compute) -> set[int]:
    return {int(name.split("-")[2][1:]) for name in segments(compute) if "-g" in name}


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_table(directory: Path, name: str, rows: int, dim: int, seed: int) -> tuple[Path, np.ndarray]:
    """A .npy of random vectors (ids are item-<row>); returns its path and the unit vectors compute serves."""
    raw = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    path = directory / name
    with open(path, "wb") as file:  # np.save(path) would add ".npy" to any other name
        np.save(file, raw)
    return path, unit(raw)


@pytest.fixture
def tables_dir(tmp_path) -> Path:
    directory = tmp_path / "tables"
    directory.mkdir()
    return directory


def test_swap_under_mixed_load_fails_no_call_and_every_answer_is_one_generations(compute_factory, tables_dir):
    compute = compute_factory(rows=ROWS, dim=DIM, seed=42, table_load_dirs=[str(tables_dir)], pool_size=2)
    first, _ = synthetic_arrays(ROWS, DIM, 42)
    second_path, second = write_table(tables_dir, "second.npy", ROWS, DIM, seed=7)
    expected = {1: first, 2: second, 3: first}  # generation 3: back to the synthetic table
    ids = np.char.add(b"item-", np.arange(ROWS).astype("S"))
    queries = unit(np.random.default_rng(3).standard_normal((8, DIM)).astype(np.float32))
    best = {g: [[f"item-{row}" for row, _ in top_k(v, ids, q, 5)] for q in queries] for g, v in expected.items()}
    workers_before = set(compute.worker_pids())

    stop = threading.Event()
    seen: dict[str, list[tuple[int, object]]] = {"item": [], "search": []}
    failures: list[str] = []

    def items(stub):
        n = 0
        while not stop.is_set():
            row = (n * 7919) % ROWS
            try:
                item, call = stub.GetItem.with_call(compute_pb2.GetItemRequest(id=f"item-{row}"), timeout=CALL_TIMEOUT)
                seen["item"].append((int(dict(call.trailing_metadata())[GENERATION_KEY]), (row, np.array(item.vector, np.float32))))
            except grpc.RpcError as exc:
                failures.append(f"GetItem: {exc.code().name} {exc.details()}")
            n += 1

    def searches(stub):
        n = 0
        while not stop.is_set():
            index = n % len(queries)
            try:
                reply, call = stub.Search.with_call(search_pb2.SearchRequest(vector=queries[index].tolist(), k=5), timeout=CALL_TIMEOUT)
                seen["search"].append((int(dict(call.trailing_metadata())[GENERATION_KEY]), (index, [h.id for h in reply.hits])))
            except grpc.RpcError as exc:
                failures.append(f"Search: {exc.code().name} {exc.details()}")
            n += 1

    stub = service(compute)
    threads = [threading.Thread(target=items, args=(stub,)), *(threading.Thread(target=searches, args=(stub,)) for _ in range(3))]
    for thread in threads:
        thread.start()
    def answered_by(generation: int) -> bool:
        return all(any(g == generation for g, _ in seen[kind]) for kind in seen)

    try:
        # Each phase lasts until both kinds of call have been answered on its generation (the
        # Searches' pace is this machine's: the pool runs at nice 19).
        wait_until(lambda: answered_by(1), 60, message="calls answered on generation 1")
        swapped = load_file(compute, second_path)
        assert (swapped.previous_generation, swapped.table.generation) == (1, 2)
        assert swapped.table.source == str(second_path) and swapped.table.rows == ROWS
        wait_until(lambda: answered_by(2), 60, message="calls answered on generation 2")
        back = load(compute, synthetic=compute_pb2.SyntheticTableSource(rows=ROWS, dim=DIM, seed=42))
        assert back.table.generation == 3
        wait_until(lambda: answered_by(3), 60, message="calls answered on generation 3")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)

    assert failures == []
    for generation, (row, vector) in seen["item"]:
        np.testing.assert_array_equal(vector, expected[generation][row], err_msg=f"GetItem item-{row}, generation {generation}")
    for generation, (index, hit_ids) in seen["search"]:
        assert hit_ids == best[generation][index], f"Search {index} answered by generation {generation}"
    for kind in ("item", "search"):
        assert {g for g, _ in seen[kind]} == {1, 2, 3}, f"{kind}: only generations 1, 2 and 3 answered"

    # The old generations' segments go once their calls and workers are gone; so do the workers.
    wait_until(lambda: generations_in_shm(compute) == {3}, 30, message="only generation 3 left in shm")
    assert not workers_before & set(compute.worker_pids())
    cache = stats(compute)
    assert (cache.generation, cache.retiring_generations, cache.loading, cache.last_load_error) == (3, [], False, "")
    assert cache.source.startswith("synthetic(") and cache.loaded_at.seconds > 0 and cache.load_seconds > 0
    text = compute.metrics_text()
    assert metric_sample(text, "offload_compute_table_generation") == 3
    assert metric_sample(text, "offload_compute_table_loads_total", outcome="ok") == 2
    assert metric_sample(text, "offload_compute_table_info", generation="3") == 1


def mapped_old_segments(compute, generation: int) -> list[str]:
    """Mappings of a generation's (unlinked) segments in compute or any of its processes."""
    found = []
    for proc in [psutil.Process(compute.pid), *psutil.Process(compute.pid).children(recursive=True)]:
        try:
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
        except OSError:
            continue
        found += [f"{proc.pid}: {line.split()[-2]}" for line in maps.splitlines() if f"-g{generation}-" in line and "offload-" in line]
    return found


def test_the_old_tables_memory_is_released_even_when_no_call_follows(compute_factory):
    compute = compute_factory(rows=ROWS, dim=DIM)
    stub = service(compute)
    for n in range(20):  # the pool's slots and the loop last saw calls on generation 1
        stub.Search(search_pb2.SearchRequest(vector=[1.0 + n] + [0.5] * (DIM - 1), k=3), timeout=CALL_TIMEOUT)
        stub.GetItem(compute_pb2.GetItemRequest(id=f"item-{n}"), timeout=CALL_TIMEOUT)
    assert mapped_old_segments(compute, 1), "compute and its workers map generation 1"
    load(compute, synthetic=compute_pb2.SyntheticTableSource(rows=ROWS, dim=DIM, seed=3))
    wait_until(lambda: generations_in_shm(compute) == {2}, 30, message="generation 1 unlinked")
    wait_until(lambda: not mapped_old_segments(compute, 1), 30, message="no process maps generation 1 any more")


def test_bad_sources_are_refused_before_anything_changes(compute_factory, tables_dir, tmp_path):
    compute = compute_factory(rows=2000, dim=DIM, table_load_dirs=[str(tables_dir)])
    before = segments(compute)
    nan_path, _ = write_table(tables_dir, "nan.npy", 100, DIM, seed=1)
    bad = np.load(nan_path)
    bad[50, 3] = np.nan
    np.save(nan_path, bad)
    wide_path, _ = write_table(tables_dir, "wide.npy", 100, DIM * 2, seed=1)
    duplicate_path, _ = write_table(tables_dir, "dup.npy", 3, DIM, seed=1)
    (tables_dir / "dup.txt").write_text("a\nb\na\n")
    (tables_dir / "text.npy").write_text("not a numpy file")
    outside, _ = write_table(tmp_path, "outside.npy", 100, DIM, seed=1)
    (tables_dir / "link.npy").symlink_to(outside)

    cases = [
        (dict(file=compute_pb2.NpyTableSource(vectors_path=str(nan_path))), grpc.StatusCode.INVALID_ARGUMENT, "NaN/Inf"),
        (dict(file=compute_pb2.NpyTableSource(vectors_path=str(wide_path))), grpc.StatusCode.FAILED_PRECONDITION, "dimension 32"),
        (dict(file=compute_pb2.NpyTableSource(vectors_path=str(duplicate_path), ids_path=str(tables_dir / "dup.txt"))),
         grpc.StatusCode.INVALID_ARGUMENT, "ids must be unique"),
        (dict(file=compute_pb2.NpyTableSource(vectors_path=str(tables_dir / "missing.npy"))), grpc.StatusCode.INVALID_ARGUMENT,
         "No such file"),
        (dict(file=compute_pb2.NpyTableSource(vectors_path=str(tables_dir / "text.npy"))), grpc.StatusCode.INVALID_ARGUMENT,
         "cannot be loaded"),
        (dict(file=compute_pb2.NpyTableSource(vectors_path=str(outside))), grpc.StatusCode.INVALID_ARGUMENT, "outside the directories"),
        (dict(file=compute_pb2.NpyTableSource(vectors_path=str(tables_dir / "link.npy"))), grpc.StatusCode.INVALID_ARGUMENT,
         "outside the directories"),
        # Far more than /dev/shm holds: refused from the header alone, before a byte is copied.
        (dict(synthetic=compute_pb2.SyntheticTableSource(rows=1_000_000_000, dim=65536), allow_dimension_change=True),
         grpc.StatusCode.FAILED_PRECONDITION, "not enough shared memory"),
        (dict(synthetic=compute_pb2.SyntheticTableSource(rows=0, dim=DIM)), grpc.StatusCode.INVALID_ARGUMENT, "rows"),
        (dict(), grpc.StatusCode.INVALID_ARGUMENT, "source"),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.RpcError) as caught:
            load(compute, **request)
        assert caught.value.code() == code and message in caught.value.details(), (request, caught.value.details())
        assert str(tables_dir) not in caught.value.details() and str(tmp_path) not in caught.value.details()
        assert segments(compute) == before, f"{request}: shared memory changed"
        cache = stats(compute)
        assert cache.generation == 1 and cache.source.startswith("synthetic(")

    # The refused loads that had begun to copy (NaN, duplicate ids) left nothing mapped either.
    wait_until(lambda: not mapped_old_segments(compute, 2), 30, message="no mapping of a refused table")
    # The last refusal that reached the loader is the one shown (the last two broke the proto's rules).
    assert stats(compute).last_load_error.startswith("not enough shared memory")
    assert metric_sample(compute.metrics_text(), "offload_compute_table_loads_total", outcome="failed") == 8
    reply = service(compute).GetItem(compute_pb2.GetItemRequest(id="item-7"), timeout=5)
    np.testing.assert_array_equal(np.array(reply.vector, np.float32), synthetic_arrays(2000, DIM, 42)[0][7])
    # A change of dimension, when allowed: the new table serves; old-dimension queries are refused clearly.
    assert load_file(compute, wide_path, allow_dimension_change=True).table.dim == DIM * 2
    with pytest.raises(grpc.RpcError) as caught:
        service(compute).Search(search_pb2.SearchRequest(vector=[1.0] * DIM, k=3), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "must have 32 values" in caught.value.details()


def test_a_second_load_while_one_runs_is_aborted(compute_factory, tables_dir):
    compute = compute_factory(rows=2000, dim=8, table_load_dirs=[str(tables_dir)])
    big = compute_pb2.SyntheticTableSource(rows=4_000_000, dim=8, seed=1)
    first = service(compute).LoadTable.future(compute_pb2.LoadTableRequest(synthetic=big), timeout=120)
    wait_until(lambda: stats(compute).loading, 30, message="the first load under way")
    with pytest.raises(grpc.RpcError) as caught:
        load(compute, synthetic=compute_pb2.SyntheticTableSource(rows=10, dim=8))
    assert caught.value.code() == grpc.StatusCode.ABORTED
    assert first.result().table.generation == 2


def test_sigkill_during_a_load_restarts_on_the_last_good_source(compute_factory, tables_dir):
    compute = compute_factory(rows=2000, dim=8, table_load_dirs=[str(tables_dir)])
    good_path, good = write_table(tables_dir, "good.npy", 3000, 8, seed=5)
    assert load_file(compute, good_path).table.generation == 2
    family = [compute.proc.pid] + [p.pid for p in psutil.Process(compute.pid).children(recursive=True)]

    pending = service(compute).LoadTable.future(
        compute_pb2.LoadTableRequest(synthetic=compute_pb2.SyntheticTableSource(rows=8_000_000, dim=8, seed=1)), timeout=120
    )
    wait_until(lambda: 3 in generations_in_shm(compute), 30, message="generation 3 being copied")
    dead = compute.pid
    compute.kill()
    kill_orphans([psutil.Process(pid) for pid in family if psutil.pid_exists(pid)])
    with pytest.raises(grpc.RpcError):
        pending.result()
    assert any(f"-{dead}-g3-" in name for name in segments(compute)), "the half-built segments outlive the kill"

    compute.start()  # the same settings, shm_dir and state file
    assert not any(f"-{dead}-" in name for name in segments(compute)), "the start-up sweep removed them"
    cache = stats(compute)
    assert (cache.source, cache.rows, cache.generation) == (str(good_path), 3000, 3)
    reply = service(compute).GetItem(compute_pb2.GetItemRequest(id="item-11"), timeout=5)
    np.testing.assert_array_equal(np.array(reply.vector, np.float32), good[11])
    assert any(r["msg"] == "removed stale shared-memory segments" for r in compute.log_records())

    # A plain restart keeps the loaded table too; settings that name another source win.
    compute.stop()
    compute.start()
    assert (stats(compute).source, stats(compute).generation) == (str(good_path), 4)
    compute.stop()
    compute.env["OFFLOAD_COMPUTE_ROWS"] = "2500"
    compute.start()
    cache = stats(compute)
    assert (cache.source, cache.rows, cache.generation) == ("synthetic(rows=2500, dim=8, seed=42)", 2500, 5)


def test_workers_killed_during_a_swap_are_replaced_and_the_swap_completes(compute_factory, tables_dir):
    compute = compute_factory(rows=2000, dim=8, table_load_dirs=[str(tables_dir)], rebuild_backoff_seconds=0.05)
    old_workers = compute.worker_pids()
    pending = service(compute).LoadTable.future(
        compute_pb2.LoadTableRequest(synthetic=compute_pb2.SyntheticTableSource(rows=6_000_000, dim=8, seed=1)), timeout=120
    )
    wait_until(lambda: 2 in generations_in_shm(compute), 30, message="generation 2 being copied")
    for pid in old_workers:  # generation 1's workers, while generation 2 is being built
        psutil.Process(pid).send_signal(signal.SIGKILL)
    assert pending.result().table.generation == 2
    new_workers = compute.worker_pids()
    for pid in new_workers:  # generation 2's, right after the switch
        psutil.Process(pid).send_signal(signal.SIGKILL)
    wait_until(lambda: len(compute.worker_pids()) == 2 and not set(compute.worker_pids()) & set(new_workers), 30,
               message="generation 2's workers replaced")  # fmt: skip
    wait_until(lambda: generations_in_shm(compute) == {2}, 30, message="only generation 2 left")
    wait_until(lambda: service(compute).GetStats(compute_pb2.GetStatsRequest(), timeout=5).pool.healthy, 30)
    reply = service(compute).Search(search_pb2.SearchRequest(vector=[1.0] * 8, k=3), timeout=30)
    assert len(reply.hits) == 3 and all(int(h.id.split("-")[1]) < 6_000_000 for h in reply.hits)


def test_a_job_records_the_generation_of_each_chunk(compute_factory, tables_dir):
    rows, dim = 1_000_000, 32
    compute = compute_factory(
        rows=rows, dim=dim, seed=42, table_load_dirs=[str(tables_dir)], jobs_chunk_queries=1, jobs_chunks_in_flight=1
    )
    second_path, second = write_table(tables_dir, "second.npy", rows, dim, seed=9)
    first, _ = synthetic_arrays(rows, dim, 42)
    ids = np.char.add(b"item-", np.arange(rows).astype("S"))
    queries = unit(np.random.default_rng(4).standard_normal((60, dim)).astype(np.float32))
    spec = jobs_pb2.BatchSearchSpec(k=3, vectors=[jobs_pb2.Vector(values=q.tolist()) for q in queries])
    job = service(compute).SubmitJob(jobs_pb2.SubmitJobRequest(batch_search=spec), timeout=10)

    def done() -> int:
        return service(compute).GetJob(jobs_pb2.GetJobRequest(id=job.id), timeout=10).progress.done

    wait_until(lambda: done() >= 8, 60, message="a few chunks done on generation 1")
    # Both workers busy with interactive calls (which go first): the job waits while the table
    # is swapped, whatever the speed of this machine.
    testing = testing_pb2_grpc.TestingServiceStub(compute.channel())
    spins = [testing.Spin.future(testing_pb2.SpinRequest(seconds=2.0), timeout=30) for _ in range(2)]
    wait_until(lambda: stats_of(compute).pool.busy == 2 and stats_of(compute).pool.queued >= 1, 10,
               message="the job's next chunk waiting behind the Spins")  # fmt: skip
    before_swap = done()
    load_file(compute, second_path)
    assert done() <= before_swap + 1 and [spin.result().pid for spin in spins]
    wait_until(lambda: service(compute).GetJob(jobs_pb2.GetJobRequest(id=job.id), timeout=10).state == jobs_pb2.SUCCEEDED,
               120, message="the job done")  # fmt: skip
    final = service(compute).GetJob(jobs_pb2.GetJobRequest(id=job.id, result_limit=1000), timeout=10)
    assert list(final.table_generations) == [1, 2]
    answers = [[h.id for h in entry.hits] for entry in final.result.batch_search.results]
    on = {g: [[f"item-{row}" for row, _ in top_k(v, ids, q, 3)] for q in queries] for g, v in ((1, first), (2, second))}
    # Chunks run in order: a prefix of the queries was answered by generation 1, the rest by 2.
    switch = next(i for i, answer in enumerate(answers) if answer != on[1][i])
    assert 8 <= switch < len(queries)
    assert answers == on[1][:switch] + on[2][switch:]


def test_table_watch_loads_the_file_again_when_it_is_replaced(compute_factory, tables_dir):
    path, _ = write_table(tables_dir, "live.npy", 1000, 8, seed=1)
    compute = compute_factory(vectors_path=str(path), table_watch=True)
    assert stats(compute).generation == 1
    replacement, fresh = write_table(tables_dir, "live.npy.tmp", 1200, 8, seed=2)
    replacement.replace(path)  # published the safe way: written aside, then renamed over the old one
    wait_until(lambda: stats(compute).generation == 2, 30, message="the replaced file loaded")
    cache = stats(compute)
    assert (cache.rows, cache.source) == (1200, str(path))
    reply = service(compute).GetItem(compute_pb2.GetItemRequest(id="item-1100"), timeout=5)
    np.testing.assert_array_equal(np.array(reply.vector, np.float32), fresh[1100])
    wait_until(lambda: generations_in_shm(compute) == {2}, 30, message="generation 1 gone")
    state = json.loads(Path(compute.env["OFFLOAD_COMPUTE_JOBS_DB_PATH"]).with_suffix(".table.json").read_text())
    assert state["generation"] == 2 and state["source"] == {"file": {"vectors_path": str(path), "ids_path": ""}}


def test_the_cli_loads_a_table_given_by_a_path_relative_to_the_callers_directory(compute_factory, tables_dir):
    compute = compute_factory(rows=2000, dim=8, table_load_dirs=[str(tables_dir)])
    path, _ = write_table(tables_dir, "next.npy", 2500, 8, seed=3)
    (tables_dir / "next.txt").write_text("".join(f"doc-{n}\n" for n in range(2500)))

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "compute.client", "--address", compute.address, "load-table", *args],
            cwd=tables_dir.parent, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        )

    loaded = cli("tables/next.npy", "--ids", "tables/next.txt")
    assert loaded.returncode == 0, loaded.stderr
    reply = json.loads(loaded.stdout)
    assert reply["table"]["generation"] == "2" and reply["table"]["source"] == f"{path} (ids {tables_dir / 'next.txt'})"
    assert service(compute).GetItem(compute_pb2.GetItemRequest(id="doc-2499"), timeout=5).id == "doc-2499"
    synthetic = cli("--synthetic", "3000,8,1")
    assert synthetic.returncode == 0 and json.loads(synthetic.stdout)["table"]["rows"] == "3000"
    refused = cli("--synthetic", "3000,9,1")
    assert refused.returncode == 1 and refused.stderr.startswith("FAILED_PRECONDITION: the new table has dimension 9")
    assert cli().returncode == 2  # no source: a usage error


def test_a_compute_configured_with_a_file_restarts_on_the_file_it_last_loaded(compute_factory, tables_dir):
    first, _ = write_table(tables_dir, "first.npy", 1000, 8, seed=1)
    second, vectors = write_table(tables_dir, "second.npy", 1500, 8, seed=2)
    compute = compute_factory(vectors_path=str(first))
    assert load_file(compute, second).table.generation == 2
    compute.stop()
    compute.start()
    cache = stats(compute)
    assert (cache.source, cache.rows, cache.generation) == (str(second), 1500, 3)
    reply = service(compute).GetItem(compute_pb2.GetItemRequest(id="item-1400"), timeout=5)
    np.testing.assert_array_equal(np.array(reply.vector, np.float32), vectors[1400])


def test_sigterm_during_a_load_stops_it_and_leaves_nothing(compute_factory):
    compute = compute_factory(rows=2000, dim=8)
    channel = grpc.insecure_channel(compute.address)  # its own: compute.stop() closes the fixture's
    pending = compute_pb2_grpc.ComputeServiceStub(channel).LoadTable.future(
        compute_pb2.LoadTableRequest(synthetic=compute_pb2.SyntheticTableSource(rows=20_000_000, dim=8, seed=1)), timeout=120
    )
    wait_until(lambda: 2 in generations_in_shm(compute), 30, message="generation 2 being copied")
    started = time.monotonic()
    assert compute.stop() == 0
    assert time.monotonic() - started < 8, "the load stopped at its next block, it did not run to its end"
    with pytest.raises(grpc.RpcError) as caught:
        pending.result()
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and "the load was stopped" in caught.value.details()
    channel.close()
    assert segments(compute) == [], "the stopped load's segments were removed"


def test_old_generation_workers_killed_while_their_calls_run(compute_factory):
    compute = compute_factory(rows=2000, dim=8, rebuild_backoff_seconds=0.05)
    testing = testing_pb2_grpc.TestingServiceStub(compute.channel())
    spins = [testing.Spin.future(testing_pb2.SpinRequest(seconds=3.0), timeout=30) for _ in range(2)]
    wait_until(lambda: stats_of(compute).pool.busy == 2, 10, message="both workers spinning on generation 1")
    old_workers = compute.worker_pids()
    load(compute, synthetic=compute_pb2.SyntheticTableSource(rows=3000, dim=8, seed=2))
    assert stats(compute).retiring_generations == [1]  # its Spins still run
    for pid in old_workers:
        psutil.Process(pid).send_signal(signal.SIGKILL)
    for spin in spins:
        with pytest.raises(grpc.RpcError) as caught:
            spin.result()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    wait_until(lambda: stats(compute).retiring_generations == [] and generations_in_shm(compute) == {2}, 15,
               message="generation 1 retired")  # fmt: skip
    wait_until(lambda: len(compute.worker_pids()) == 2, 15, message="only generation 2's two workers")
    assert not set(compute.worker_pids()) & set(old_workers)
    assert testing.Spin(testing_pb2.SpinRequest(seconds=0.01), timeout=10).pid in compute.worker_pids()
