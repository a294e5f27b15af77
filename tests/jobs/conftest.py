"""Job fixtures: a compute shared by a module's tests, with small chunks so jobs have several."""

from __future__ import annotations

from typing import Iterator

import pytest

from compute.table import EmbeddingTable
from tests.conftest import ComputeLauncher, ComputeProcess

SHARED_SETTINGS = {"rows": 2000, "dim": 16, "jobs_chunk_queries": 8, "jobs_max_queries": 500, "max_k": 500}


@pytest.fixture(scope="module")
def jobs_compute(tmp_path_factory) -> Iterator[ComputeProcess]:
    """A compute for tests that only add their own jobs (never kill, reconfigure or fill it)."""
    launcher = ComputeLauncher(tmp_path_factory.mktemp("jobs"))
    yield launcher(**SHARED_SETTINGS)
    launcher.close()


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> EmbeddingTable:
    """The synthetic table the shared compute builds (same rows, dim, seed), in-process."""
    return EmbeddingTable.build(tmp_path_factory.mktemp("table"), rows=2000, dim=16, seed=42)


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server for the session (tests/postgres.py), stopped at the end."""
    from tests.postgres import PostgresServer

    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_database(postgres_server) -> str:
    """The URL of a fresh, empty database on the session's server."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.url.rsplit("/", 1)[0] + "/" + name
