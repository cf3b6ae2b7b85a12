"""What only SQLite does: wake-ups across processes by watching commits, reads on the loop."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from fluxserve.errors import StoreOpenFailed, StoreUnavailable
from fluxserve.runtime import Runtime
from fluxserve.store import sqlite as sqlite_module
from fluxserve.store.base import SqliteSynchronous
from fluxserve.store.sqlite import SqliteDatabase
from fluxserve.store.store import SqlStore
from fluxserve.tasks import TaskStatus

import sqlite_connections
from conftest import make_settings, queue_position, queue_task


@pytest.fixture
async def two_stores(tmp_path: Path) -> AsyncIterator[tuple[SqlStore, SqlStore]]:
    """Two stores on one file: as an `api` and a `worker` process hold it."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    first, second = SqlStore(SqliteDatabase(url)), SqlStore(SqliteDatabase(url))
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_a_submit_in_one_process_wakes_a_worker_in_another(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    worker_side, api_side = two_stores
    # The poll fallback is 60 s here: only the commit watcher can end this wait in time.
    waiting = asyncio.create_task(worker_side.wait_for_task(at_most=60))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    task_id = await queue_task(api_side)
    await asyncio.wait_for(waiting, 5)
    claim = await worker_side.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == task_id


async def test_a_commit_between_a_claim_and_the_wait_is_not_missed(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    worker_side, api_side = two_stores
    await queue_task(api_side)
    await asyncio.wait_for(worker_side.wait_for_task(at_most=60), 5)
    assert await worker_side.claim_task(["flux-2-flex"], "w1", 30) is None
    await queue_task(api_side)  # lands after the empty claim, before the worker waits again
    await asyncio.wait_for(worker_side.wait_for_task(at_most=60), 5)


async def test_reads_see_each_commit_of_another_process_at_once(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    reader, writer = two_stores
    first = await queue_task(writer)
    found = await reader.get_task_and_position(first)
    assert found is not None and found[1] == 1
    second = await queue_task(writer)
    assert await queue_position(reader, second) == 2
    claim = await writer.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    task = await reader.get_task(first)
    assert task is not None and task.status is TaskStatus.RUNNING
    assert await queue_position(reader, second) == 1


async def test_a_submit_waits_off_the_loop_while_another_process_writes(
    two_stores: tuple[SqlStore, SqlStore], tmp_path: Path
) -> None:
    store, _ = two_stores
    other_process = sqlite3.connect(tmp_path / "store.db", isolation_level=None)
    other_process.execute("BEGIN IMMEDIATE")  # holds the write lock
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    submitting = asyncio.create_task(queue_task(store))
    try:
        await asyncio.sleep(0.3)
        assert not submitting.done()
        assert ticks >= 10, "the loop ran on while the submit waited for the lock"
        other_process.execute("COMMIT")
        task_id = await asyncio.wait_for(submitting, 10)
    finally:
        ticker.cancel()
        other_process.close()
    assert await queue_position(store, task_id) == 1


async def test_submits_on_the_loop_leave_the_wal_checkpoint_to_a_thread(
    two_stores: tuple[SqlStore, SqlStore],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, _ = two_stores
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 20)
    checkpointed_on: list[threading.Thread] = []
    done = threading.Event()
    checkpoint = sqlite_module._checkpoint

    def watched_checkpoint(*args: Any) -> None:
        checkpoint(*args)
        checkpointed_on.append(threading.current_thread())
        done.set()

    monkeypatch.setattr(sqlite_module, "_checkpoint", watched_checkpoint)
    database = tmp_path / "store.db"
    before = database.stat().st_size
    for _ in range(19):
        await queue_task(store)
    assert checkpointed_on == []
    assert database.stat().st_size == before, "the tasks are in the WAL only"
    await queue_task(store)
    assert await asyncio.to_thread(done.wait, 10), "the 20th commit starts a checkpoint"
    assert checkpointed_on[0] is not threading.main_thread()
    assert database.stat().st_size > before, "the checkpoint wrote them into the file"
    assert await queue_position(store, await queue_task(store)) == 21


async def test_submits_arriving_together_share_one_commit(
    two_stores: tuple[SqlStore, SqlStore], tmp_path: Path
) -> None:
    # Each commit appends the pages it changed to the WAL: a burst that commits
    # once appends them once.
    store, _ = two_stores
    wal = tmp_path / "store.db-wal"
    start = wal.stat().st_size
    one_by_one = [await queue_task(store) for _ in range(10)]
    after_one_by_one = wal.stat().st_size
    together = await asyncio.gather(*(queue_task(store) for _ in range(10)))
    after_together = wal.stat().st_size
    assert (after_together - after_one_by_one) * 4 < after_one_by_one - start
    positions = [await queue_position(store, task_id) for task_id in [*one_by_one, *together]]
    assert positions == list(range(1, 21))


class FailingCommit:
    """The loop's writer, on a disk that fails when a transaction commits."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    @property
    def in_transaction(self) -> bool:
        return self.connection.in_transaction

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("disk I/O error")
        return self.connection.execute(sql, *args)


# One submit commits alone; several arriving together share one commit.
@pytest.mark.parametrize("submits", [1, 4])
async def test_submits_whose_commit_fails_are_unavailable_and_leave_nothing(
    two_stores: tuple[SqlStore, SqlStore], submits: int
) -> None:
    store, _ = two_stores
    database = store.db
    assert isinstance(database, SqliteDatabase)
    writer, database._writer = database._writer, FailingCommit(database._writer)  # type: ignore[arg-type,assignment]
    try:
        answers = await asyncio.gather(
            *(queue_task(store) for _ in range(submits)), return_exceptions=True
        )
    finally:
        database._writer = writer
    assert all(isinstance(answer, StoreUnavailable) for answer in answers)
    assert all("disk I/O error" in str(answer) for answer in answers)
    assert await store.queue_depths() == {}
    task_id = await queue_task(store)
    assert await queue_position(store, task_id) == 1


class LockedConnection:
    """A reader that finds the database locked, as while another process recovers it."""

    def execute(self, *_: Any) -> Any:
        raise sqlite3.OperationalError("database is locked")


async def test_a_read_that_finds_the_database_locked_waits_off_the_loop(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    store, _ = two_stores
    task_id = await queue_task(store)
    database = store.db
    assert isinstance(database, SqliteDatabase)
    reader, database._reader = database._reader, LockedConnection()  # type: ignore[assignment]
    try:
        task = await store.get_task(task_id)
    finally:
        database._reader = reader
    assert task is not None and task.task_id == task_id


async def test_a_read_that_finds_the_database_locked_and_cannot_open_it_is_an_outage(
    two_stores: tuple[SqlStore, SqlStore], tmp_path: Path
) -> None:
    """Locked on the loop, and no connection off it can open the file (a disk gone,
    say): StoreUnavailable, which the API answers 503, not the driver's error."""
    store, _ = two_stores
    database = store.db
    assert isinstance(database, SqliteDatabase)
    reader, database._reader = database._reader, LockedConnection()  # type: ignore[assignment]
    path, database._path = database._path, tmp_path  # a folder: no database opens there
    try:
        with pytest.raises(StoreUnavailable, match="unable to open"):
            await store.get_task("task-unified-0-missing0")
    finally:
        database._reader, database._path = reader, path


class WatchedLockedConnection(LockedConnection):
    """A locked reader that says when it has refused a statement."""

    def __init__(self) -> None:
        self.refused = asyncio.Event()

    def execute(self, *args: Any) -> Any:
        self.refused.set()
        return super().execute(*args)


async def test_a_worker_waiting_while_the_database_is_locked_is_woken_not_failed(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    """The look for other processes' commits finds the database locked: the waiting
    worker is woken (its claim then waits for the lock), not handed the driver's error."""
    store, _ = two_stores
    database = store.db
    assert isinstance(database, SqliteDatabase)
    reader, database._reader = database._reader, LockedConnection()  # type: ignore[assignment]
    try:
        await asyncio.wait_for(store.wait_for_task(at_most=60), 5)
    finally:
        database._reader = reader


async def test_streams_see_other_processes_commits_after_the_database_was_locked(
    two_stores: tuple[SqlStore, SqlStore],
) -> None:
    watcher, api_side = two_stores
    database = watcher.db
    assert isinstance(database, SqliteDatabase)
    assert await watcher.task_changes(at_most=0) is None  # the first take starts the watch
    locked = WatchedLockedConnection()
    reader, database._reader = database._reader, locked  # type: ignore[assignment]
    try:
        await asyncio.wait_for(locked.refused.wait(), 5)  # the watch looked while locked
    finally:
        database._reader = reader
    await watcher.task_changes(at_most=0)  # whatever the locked look said
    await queue_task(api_side)
    # The commit names no task here: "any task may have changed" (None).
    assert await asyncio.wait_for(watcher.task_changes(at_most=60), 5) is None


def connections_of_another_process(data_dir: Path, synchronous: str, out: Path) -> list[Any]:
    """The connections `fluxserve keys create`, run as a process of its own on the
    same database, opened; with the setting from its environment."""
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
        "FLUXSERVE_DATA_DIR": str(data_dir),
        "FLUXSERVE_SQLITE_SYNCHRONOUS": synchronous,
    }
    command = [sys.executable, str(tests / "sqlite_connections.py"), str(out)]
    subprocess.run(
        [*command, "keys", "create", "--name", "other"], env=env, timeout=120, check=True
    )
    return [sqlite_connections.Opened(**each) for each in json.loads(out.read_text())]


@pytest.mark.parametrize("synchronous", ["full", "normal"])
async def test_the_sync_setting_reaches_every_connection_of_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    # SQLite keeps `synchronous` per connection: one that misses the setting runs
    # with SQLite's own default (full) or a mode of its own.
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 3)
    opened = sqlite_connections.record(monkeypatch.setattr)
    settings = make_settings(tmp_path / "data", sqlite_synchronous=synchronous)
    runtime = Runtime(settings, run_worker=False)
    await runtime.start()
    try:
        for _ in range(3):
            await queue_task(runtime.store)  # the third commit checkpoints, on a thread
        other = await asyncio.to_thread(
            connections_of_another_process, settings.data_dir, synchronous, tmp_path / "other.json"
        )
    finally:
        await runtime.stop()
    # Each path the store opens connections on, with the mode its connections ran in.
    every_path = ["_checkpoint", "_migrate", "_open_reader", "_open_writer"]
    assert sorted({(each.opened_by, each.synchronous) for each in opened}) == [
        (path, synchronous) for path in every_path
    ]
    assert sorted({(each.opened_by, each.synchronous) for each in other}) == [
        (path, synchronous) for path in ["_migrate", "_open_reader", "_open_writer"]
    ]


def test_the_sync_setting_takes_sqlites_spelling_and_refuses_other_modes(tmp_path: Path) -> None:
    assert make_settings(tmp_path, sqlite_synchronous="NORMAL").sqlite_synchronous == "normal"
    assert make_settings(tmp_path).sqlite_synchronous == "full"
    env = {**os.environ, "FLUXSERVE_DATA_DIR": str(tmp_path), "FLUXSERVE_SQLITE_SYNCHRONOUS": "off"}
    done = subprocess.run(
        [sys.executable, "-m", "fluxserve", "keys", "list"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "setting sqlite_synchronous: Input should be 'full' or 'normal'" in done.stderr
    assert not (tmp_path / "fluxserve.db").exists()


@pytest.mark.parametrize(("synchronous", "on_the_loop"), [("full", False), ("normal", True)])
async def test_a_commit_that_waits_for_the_disk_leaves_the_loop_free(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    synchronous: SqliteSynchronous,
    on_the_loop: bool,
) -> None:
    committed_on: list[threading.Thread] = []
    commit = sqlite_module._commit

    def watched_commit(connection: sqlite3.Connection) -> None:
        commit(connection)
        committed_on.append(threading.current_thread())

    monkeypatch.setattr(sqlite_module, "_commit", watched_commit)
    store = SqlStore(SqliteDatabase(f"sqlite:///{tmp_path / 'store.db'}", synchronous))
    await store.start()
    try:
        together = await asyncio.gather(*(queue_task(store) for _ in range(4)))
        assert [await queue_position(store, task_id) for task_id in together] == [1, 2, 3, 4]
    finally:
        await store.close()
    assert committed_on
    assert all((thread is threading.main_thread()) is on_the_loop for thread in committed_on)


async def test_a_write_cancelled_twice_while_it_commits_is_committed_whole(
    two_stores: tuple[SqlStore, SqlStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit on its thread cannot be called back: however often its caller is
    cancelled meanwhile, the writer stays its own until the commit ends, and no
    ROLLBACK on the loop races the COMMIT on the thread."""
    store, _ = two_stores
    commit = sqlite_module._commit
    began, go_on = threading.Event(), threading.Event()

    def held_commit(connection: sqlite3.Connection) -> None:
        began.set()
        go_on.wait()
        commit(connection)

    monkeypatch.setattr(sqlite_module, "_commit", held_commit)
    heartbeat = asyncio.create_task(store.record_heartbeat("w1", ["flux-2-pro"], "tiny", "ready"))
    await asyncio.to_thread(began.wait)
    heartbeat.cancel()
    await asyncio.sleep(0)  # the first cancel lands; the second finds it waiting
    heartbeat.cancel()
    next_write = asyncio.create_task(store.forget_worker("w2"))
    await asyncio.sleep(0)
    go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await heartbeat
    await next_write
    assert [worker.worker_id for worker in await store.live_workers(60)] == ["w1"]


async def test_a_database_that_cannot_be_opened_is_named_with_what_is_wrong(
    tmp_path: Path,
) -> None:
    """A file that is not a database, a folder where the file should be, a data folder
    under a regular file: the start says which file and why, in one line."""
    (tmp_path / "a_file").write_text("")
    (tmp_path / "a_folder.db").mkdir()
    garbage = tmp_path / "fluxserve.db"
    garbage.write_bytes(b"these bytes are no SQLite database " * 200)
    under_a_file = tmp_path / "a_file" / "data" / "fluxserve.db"
    for path, why in [
        (garbage, "file is not a database"),
        (tmp_path / "a_folder.db", "unable to open database file"),
        (under_a_file, f"Not a directory: {under_a_file.parent}"),
    ]:
        store = SqlStore(SqliteDatabase(f"sqlite:///{path}"))
        with pytest.raises(StoreOpenFailed) as failed:
            await store.start()
        assert str(failed.value) == f"cannot open the database at {path}: {why}"


async def test_a_database_locked_beyond_the_wait_at_start_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "fluxserve.db"
    made = SqlStore(SqliteDatabase(f"sqlite:///{path}"))
    await made.start()
    await made.close()
    monkeypatch.setattr(sqlite_module, "LOCK_WAIT", 0.1)
    with closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")  # as another process's long write
        store = SqlStore(SqliteDatabase(f"sqlite:///{path}"))
        with pytest.raises(StoreOpenFailed) as failed:
            await store.start()
        holder.execute("ROLLBACK")
    assert str(failed.value) == f"cannot open the database at {path}: database is locked"
