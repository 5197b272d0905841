"""A throwaway PostgreSQL server for the multi-machine storage tests.

Uses ``LORA_SEARCH_TEST_POSTGRES_URL`` when set; otherwise starts its own server from the Debian
packages (initdb/pg_ctl, as the ``postgres`` user when running as root) on a free loopback port in a
temporary folder, and stops it afterwards. Skips the tests only where PostgreSQL is not installed;
.ci/run installs it.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest


def _bin(name: str) -> str | None:
    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@pytest.fixture(scope="session")
def postgres_server():
    """Yields a function making a fresh database URL on a running PostgreSQL server."""
    url = os.environ.get("LORA_SEARCH_TEST_POSTGRES_URL")
    if url:
        yield lambda: url
        return
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql); .ci/run installs it")
    data = Path(tempfile.mkdtemp(prefix="lora-search-pg-"))
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-U", "postgres", "--auth", "trust"]),
                   check=True, capture_output=True)
    subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-w", "-l", str(data / "server.log"),
                                 "-o", f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start"]),
                   check=True, capture_output=True)
    base = f"postgresql://postgres@127.0.0.1:{port}"

    def new_database() -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:10]
        with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"{base}/{name}"

    try:
        yield new_database
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        time.sleep(0.2)
        shutil.rmtree(data, ignore_errors=True)
