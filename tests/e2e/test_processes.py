"""The real `fluxserve` command, started, stopped and killed as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow


def fluxserve(
    *args: str, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fluxserve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=check,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "FLUXSERVE_DATA_DIR": str(tmp_path / "data"),
        "FLUXSERVE_PORT": str(free_port()),
        "FLUXSERVE_POLL_INTERVAL": "0.2",
    }


@contextmanager
def server(
    env: dict[str, str], log: Path, command: str = "serve", *options: str
) -> Iterator[subprocess.Popen[bytes]]:
    """`fluxserve serve` (or `api`) as a child process, yielded once it is ready."""
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fluxserve", command, *options], env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{env['FLUXSERVE_PORT']}/health"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                worker = httpx.get(url).json()["worker"]
                if worker is None or worker["state"] == "ready":
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


class Api:
    def __init__(self, env: dict[str, str], key: str) -> None:
        self.base = f"http://127.0.0.1:{env['FLUXSERVE_PORT']}"
        self.headers = {"Authorization": f"Bearer {key}"}

    def submit(self, **inputs: Any) -> str:
        response = httpx.post(
            self.base + "/api/generate/submit",
            json={"model": "flux-2-pro", "input": {"prompt": "a fox in the snow", **inputs}},
            headers=self.headers,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["data"]["task_id"])

    def status(self, task_id: str) -> dict[str, Any]:
        response = httpx.get(self.base + f"/api/generate/status/{task_id}", headers=self.headers)
        data: dict[str, Any] = response.json()["data"]
        return data

    def wait(self, task_id: str, states: tuple[str, ...], timeout: float = 90) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.status(task_id)
            if data["status"] in states:
                return data
            time.sleep(0.05)
        raise AssertionError(f"{task_id} never reached {states}: {data}")


def test_keys_create_list_revoke(env: dict[str, str], tmp_path: Path) -> None:
    created = fluxserve("keys", "create", "--name", "alice", env=env)
    secret = created.stdout.strip().splitlines()[-1]
    assert secret.startswith("fsk_") and len(secret) > 40
    listed = fluxserve("keys", "list", env=env).stdout
    assert "alice" in listed and "active" in listed and secret not in listed
    database = (tmp_path / "data" / "fluxserve.db").read_bytes()
    assert secret.encode() not in database, "keys are stored hashed"
    key_id = listed.split()[0]
    revoked = fluxserve("keys", "revoke", key_id, env=env).stdout
    assert revoked.startswith(f"{key_id} is revoked, since ")
    assert "active" not in fluxserve("keys", "list", env=env).stdout
    # Again (a retry, say): the same answer, the key revoked since the first time.
    assert fluxserve("keys", "revoke", key_id, env=env).stdout == revoked
    unknown = fluxserve("keys", "revoke", "key_nosuchkey", env=env, check=False)
    assert unknown.returncode == 1
    assert "No key key_nosuchkey" in unknown.stderr


@pytest.mark.parametrize(
    "command", [["serve"], ["api"], ["worker", "--engine", "tiny"], ["keys", "list"]]
)
def test_a_file_that_is_not_a_database_is_said_in_one_line(
    env: dict[str, str], tmp_path: Path, command: list[str]
) -> None:
    database = tmp_path / "data" / "fluxserve.db"
    database.parent.mkdir()
    database.write_bytes(b"these bytes are no SQLite database " * 200)
    done = fluxserve(*command, env=env, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"fluxserve: cannot open the database at {database}: file is not a database"
    )


def test_a_data_dir_that_cannot_be_made_is_said_in_one_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The data folder under a regular file: no one, root included, can make it."""
    (tmp_path / "a_file").write_text("")
    data_dir = tmp_path / "a_file" / "data"
    env = {**env, "FLUXSERVE_DATA_DIR": str(data_dir)}
    done = fluxserve("serve", env=env, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"fluxserve: cannot open the database at {data_dir / 'fluxserve.db'}: "
        f"Not a directory: {data_dir}"
    )
    doctor = fluxserve("doctor", env=env).stdout
    assert f"database: cannot open the database at {data_dir / 'fluxserve.db'}: " in doctor


def test_queued_tasks_survive_a_restart(env: dict[str, str], tmp_path: Path) -> None:
    secret = fluxserve("keys", "create", "--name", "me", env=env).stdout.split()[-1]
    api = Api(env, secret)
    log = tmp_path / "serve.log"
    with server(env, log) as process:
        ids = [api.submit(size="1:1") for _ in range(3)]
        process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once its graceful shutdown is done.
        assert process.wait(timeout=60) in (0, -signal.SIGTERM), log.read_text()
        assert "Application shutdown complete" in log.read_text()
    unfinished = [i for i in ids if api_status_offline(tmp_path, i) != "finished"]
    assert unfinished, "the restart must have work left to do"
    with server(env, log):
        results = [api.wait(task_id, ("finished", "failed")) for task_id in ids]
    assert [r["status"] for r in results] == ["finished"] * 3


def test_a_killed_server_runs_its_task_again(env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "FLUXSERVE_LEASE_SECONDS": "1"}
    secret = fluxserve("keys", "create", "--name", "me", env=env).stdout.split()[-1]
    api = Api(env, secret)
    log = tmp_path / "serve.log"
    with server(env, log) as process:
        task_id = api.submit(size="1:1", resolution="2K")
        api.wait(task_id, ("running",))
        process.kill()
        process.wait(timeout=30)
    with server(env, log):
        data = api.wait(task_id, ("finished", "failed"))
    assert data["status"] == "finished", data
    assert data["width"] == 2048


def api_status_offline(tmp_path: Path, task_id: str) -> str:
    """A task's status read straight from the SQLite file, with no server running."""
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "fluxserve.db") as conn:
        row = conn.execute("select status from tasks where task_id = ?", (task_id,)).fetchone()
    return str(row[0])


def test_the_api_process_loads_no_model_code(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    with server(env, log, command="api") as process:
        health = httpx.get(f"http://127.0.0.1:{env['FLUXSERVE_PORT']}/health").json()
        maps = Path(f"/proc/{process.pid}/maps").read_text()
    assert health["worker"] is None
    assert "libtorch" not in maps and "diffusers" not in maps
    assert '"GET /health HTTP/1.1" 200' in log.read_text()  # the access log, on by default


def test_the_access_log_can_be_turned_off(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "api.log"
    with server({**env, "FLUXSERVE_ACCESS_LOG": "false"}, log, command="api"):
        assert httpx.get(f"http://127.0.0.1:{env['FLUXSERVE_PORT']}/health").status_code == 200
    written = log.read_text()
    assert "Application startup complete" in written
    assert "GET /health" not in written


def test_a_serve_whose_worker_cannot_start_says_why_and_exits_non_zero(
    env: dict[str, str], tmp_path: Path
) -> None:
    # The real engine, with no weights on this machine: its load fails.
    env = {**env, "FLUXSERVE_ENGINE": "diffusers", "HF_HOME": str(tmp_path / "hf")}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "fluxserve", "serve"], env=env, stdout=out, stderr=out
        )
    try:
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    written = log.read_text()
    assert code == 1, written
    assert "CRITICAL fluxserve.worker: worker" in written
    assert "is defunct: engine failed to load: EngineUnavailable" in written
    assert "CRITICAL fluxserve.runtime: worker loop ended" in written


@pytest.mark.timeout(600)  # three servers start, one after the other
def test_a_task_that_kills_its_worker_max_attempts_times_fails_and_stays_failed(
    env: dict[str, str], tmp_path: Path
) -> None:
    env = {**env, "FLUXSERVE_LEASE_SECONDS": "1", "FLUXSERVE_MAX_ATTEMPTS": "2"}
    secret = fluxserve("keys", "create", "--name", "me", env=env).stdout.split()[-1]
    api = Api(env, secret)
    log = tmp_path / "serve.log"
    poisoned = None
    for _ in range(2):  # each run of the task ends with its worker killed
        with server(env, log) as process:
            poisoned = poisoned or api.submit(size="1:1", resolution="2K")
            api.wait(poisoned, ("running",))
            process.kill()
            process.wait(timeout=30)
    assert poisoned is not None
    with server(env, log):
        failed = api.wait(poisoned, ("finished", "failed"))
        plain = api.wait(api.submit(size="1:1"), ("finished", "failed"))
        again = api.status(poisoned)
    assert failed["status"] == "failed", failed
    assert failed["error_message"] == "The worker running this task was lost 2 times; giving up"
    assert plain["status"] == "finished"
    assert again["status"] == "failed"
