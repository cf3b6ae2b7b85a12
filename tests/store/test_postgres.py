"""What only PostgreSQL does: wake-ups across processes, surviving a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
import sqlalchemy as sa
from pg_proxy import PostgresProxy

from fluxserve.errors import StoreOpenFailed, StoreUnavailable
from fluxserve.store import Store, open_store
from fluxserve.store.base import Outcome, UploadRecord
from fluxserve.store.postgres import POOL_SIZE, PostgresDatabase, _Pooled
from fluxserve.store.rows import task_from_row
from fluxserve.store.schema import tasks
from fluxserve.store.store import SqlStore
from fluxserve.store.task_reads import RANKED_FROM, TASK_AND_POSITION, tasks_and_positions
from fluxserve.tasks import NewTask, ResultFile, TaskStatus, new_task_id

from conftest import (
    POSTGRES_ADMIN_URL,
    QUEUED_INPUT,
    fresh_postgres_database,
    queue_position,
    queue_task,
    until,
)


@pytest.fixture
async def two_stores() -> AsyncIterator[tuple[Store, Store]]:
    """Two stores on one database: as two processes on two machines would hold."""
    async with fresh_postgres_database() as url:
        first, second = open_store(url), open_store(url)
        await asyncio.gather(first.start(), second.start())
        try:
            yield first, second
        finally:
            await first.close()
            await second.close()


def database_of(store: Store) -> PostgresDatabase:
    assert isinstance(store, SqlStore) and isinstance(store.db, PostgresDatabase)
    return store.db


def database_name(store: Store) -> str | None:
    return sa.engine.make_url(database_of(store).dsn).database


async def drop_every_connection(store: Store) -> int:
    """Cut every connection to the store's database, as a restart does; how many."""
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        killed: int = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            database_name(store),
        )
    finally:
        await admin.close()
    return killed


async def settle(store: Store) -> None:
    """Let the listener connect and take the wake-up it gives itself on connecting."""
    await store.wait_for_task(at_most=5)


async def test_a_submit_in_one_process_wakes_a_worker_in_another(
    two_stores: tuple[Store, Store],
) -> None:
    worker_side, api_side = two_stores
    await settle(worker_side)
    # The poll fallback is 60 s here: only a NOTIFY can end this wait in time.
    waiting = asyncio.create_task(worker_side.wait_for_task(at_most=60))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    task_id = await queue_task(api_side)
    await asyncio.wait_for(waiting, 10)
    claim = await worker_side.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == task_id


async def listening(store: Store) -> list[str]:
    """What the database's LISTEN connections last ran."""
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        rows = await admin.fetch(
            "SELECT query FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN %'",
            database_name(store),
        )
    finally:
        await admin.close()
    return sorted(row["query"] for row in rows)


async def test_a_process_listens_only_on_the_channels_it_waits_on(
    two_stores: tuple[Store, Store],
) -> None:
    # An API process queues tasks but waits only for callbacks: it is not sent
    # a NOTIFY for each task the fleet queues.
    api_side, other = two_stores
    await queue_task(api_side)
    assert await listening(api_side) == []
    await asyncio.wait_for(api_side.wait_for_callback(at_most=60), 10)
    assert await listening(api_side) == ['LISTEN "fluxserve_callbacks"']
    # Waiting on tasks too adds that channel to the same connection. (The first
    # wait ends at once, on the wake-up of the task this process queued.)
    await settle(api_side)
    await settle(api_side)
    assert await listening(api_side) == ['LISTEN "fluxserve_tasks"']
    # ...and a submit elsewhere wakes it.
    waiting = asyncio.create_task(api_side.wait_for_task(at_most=60))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await queue_task(other)
    await asyncio.wait_for(waiting, 10)


async def test_both_stores_survive_the_database_dropping_every_connection(
    two_stores: tuple[Store, Store],
) -> None:
    worker_side, api_side = two_stores
    await settle(worker_side)
    await queue_task(api_side)
    killed = await drop_every_connection(api_side)
    assert killed >= 2, "the pooled and the LISTEN connections were cut"
    # Pooled connections are replaced on first use...
    second = await queue_task(api_side)
    claim = await worker_side.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None
    # ...and the listener reconnects, so wake-ups keep arriving.
    await settle(worker_side)
    waiting = asyncio.create_task(worker_side.wait_for_task(at_most=60))
    await queue_task(api_side)
    await asyncio.wait_for(waiting, 10)
    assert await api_side.get_task(second) is not None


async def test_a_read_right_after_every_connection_dropped_is_answered(
    two_stores: tuple[Store, Store],
) -> None:
    store, _ = two_stores
    task_id = await queue_task(store)
    for _ in range(5):
        assert await store.get_task(task_id) is not None  # the read pool's connections
        await drop_every_connection(store)
        found = await store.get_task_and_position(task_id)
        assert found is not None and found[1] == 1


async def test_a_submit_right_after_every_connection_dropped_is_queued_once(
    two_stores: tuple[Store, Store],
) -> None:
    store, other = two_stores
    submitted = [await queue_task(store)]
    for _ in range(3):
        await drop_every_connection(store)
        submitted.append(await queue_task(store))
    claimed = []
    while (claim := await other.claim_task(["flux-2-pro"], "w1", 30)) is not None:
        claimed.append(claim.task.task_id)
    assert claimed == submitted


class Lost:
    tries = 0


def lose_the_connection_after_the_first_commit(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> Lost:
    """Make the store's first write commit, then report its connection lost: a lone
    submit's one statement, or a shared transaction."""
    database = database_of(store)
    lost = Lost()
    one, transaction = database.one, database.transaction

    async def lost_after_one(statement: Any, **params: Any) -> Any:
        row = await one(statement, **params)
        if "new_task" in str(statement):  # the one statement that queues a task
            lost.tries += 1
            if lost.tries == 1:
                raise StoreUnavailable("database connection lost: connection was closed")
        return row

    @asynccontextmanager
    async def lost_after_commit(*args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        async with transaction(*args, **kwargs) as conn:
            yield conn
        lost.tries += 1
        if lost.tries == 1:
            raise StoreUnavailable("database connection lost: connection was closed")

    monkeypatch.setattr(database, "one", lost_after_one)
    monkeypatch.setattr(database, "transaction", lost_after_commit)
    return lost


async def task_count(store: Store) -> int:
    (count,) = await database_of(store).one(sa.select(sa.func.count()).select_from(tasks))
    return int(count)


async def transactions_that_wrote_tasks(store: Store) -> int:
    """How many transactions the task rows were written by (rows share an xmin)."""
    xmin = sa.literal_column("xmin::text")
    (count,) = await database_of(store).one(
        sa.select(sa.func.count(sa.distinct(xmin))).select_from(tasks)
    )
    return int(count)


async def open_accounts(store: Store, *names: str) -> None:
    for name in names:
        await store.create_account(f"acct_{name}", f"{name}@example.com")


def of_account(account: str) -> NewTask:
    now = time.time()
    return NewTask(new_task_id(now), "key", account, "flux-2-pro", QUEUED_INPUT, None, now)


async def test_submits_arriving_together_share_a_transaction_and_keep_their_order(
    two_stores: tuple[Store, Store],
) -> None:
    store, other = two_stores
    await open_accounts(store, "a")
    submitted = list(await asyncio.gather(*(queue_task(store) for _ in range(20))))
    assert await transactions_that_wrote_tasks(store) == 1
    positions = [await queue_position(store, task_id) for task_id in submitted]
    assert positions == list(range(1, 21))
    # The account's clock moved past all of them: the next submit queues behind.
    assert await queue_position(store, await queue_task(store)) == 21
    claimed = []
    while (claim := await other.claim_task(["flux-2-pro"], "w1", 30)) is not None:
        claimed.append(claim.task.task_id)
    assert claimed[:20] == submitted


async def test_submits_of_two_accounts_arriving_together_take_a_transaction_each(
    two_stores: tuple[Store, Store],
) -> None:
    store, _ = two_stores
    await open_accounts(store, "a", "b")

    burst = [of_account(f"acct_{name}") for name in "ababa"]
    answers = await asyncio.gather(*map(store.create_task, burst))
    assert [answer.account_id for answer in answers] == [task.account_id for task in burst]
    assert await task_count(store) == 5
    assert await transactions_that_wrote_tasks(store) == 2


async def test_an_account_whose_row_is_locked_holds_up_only_its_own_submits(
    two_stores: tuple[Store, Store],
) -> None:
    store, _ = two_stores
    await open_accounts(store, "a", "b")
    locker = await asyncpg.connect(database_of(store).dsn)
    try:
        await locker.execute("BEGIN")
        await locker.execute("SELECT 1 FROM accounts WHERE account_id = 'acct_a' FOR UPDATE")
        waiting = asyncio.create_task(store.create_task(of_account("acct_a")))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        others = [of_account("acct_b") for _ in range(3)]
        answers = await asyncio.wait_for(asyncio.gather(*map(store.create_task, others)), 10)
        assert [answer.task_id for answer in answers] == [task.task_id for task in others]
        assert not waiting.done()
        await locker.execute("COMMIT")
        assert (await asyncio.wait_for(waiting, 10)).account_id == "acct_a"
    finally:
        await locker.close()


# A lone submit commits on its own; several arriving together share a transaction.
@pytest.mark.parametrize("submits", [1, 6])
async def test_submits_whose_connection_was_lost_as_they_committed_are_queued_once(
    two_stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch, submits: int
) -> None:
    store, _ = two_stores
    await open_accounts(store, "a")
    lost = lose_the_connection_after_the_first_commit(store, monkeypatch)
    submitted = list(await asyncio.gather(*(queue_task(store) for _ in range(submits))))
    assert lost.tries >= 1
    assert await task_count(store) == submits
    positions = [await queue_position(store, task_id) for task_id in submitted]
    assert positions == list(range(1, submits + 1))


async def test_status_reads_arriving_together_get_what_reads_one_at_a_time_get(
    two_stores: tuple[Store, Store],
) -> None:
    store, _ = two_stores
    database = database_of(store)
    pro = [await queue_task(store) for _ in range(10)]
    flex = [await queue_task(store, "flux-2-flex") for _ in range(3)]
    claim = await store.claim_task(["flux-2-pro"], "w1", 30)
    assert claim is not None and claim.task.task_id == pro[0]
    wanted = [*reversed(pro), *flex, "task-unified-0-missing0"]
    assert len(wanted) >= RANKED_FROM

    one_by_one = [await database.one(TASK_AND_POSITION, task_id=i) for i in wanted]
    expected = [
        None if row is None else (task_from_row(row), row.queue_position or None)
        for row in one_by_one
    ]
    assert [None if e is None else e[1] for e in expected] == [
        9,
        8,
        7,
        6,
        5,
        4,
        3,
        2,
        1,
        None,
        1,
        2,
        3,
        None,
    ]
    together = await tasks_and_positions(database, wanted)  # one pass over both queues
    assert [
        (task_from_row(together[i]), together[i].queue_position or None) if i in together else None
        for i in wanted
    ] == expected
    # Through the status read itself, all at once: rounds of them, the same answers.
    assert await asyncio.gather(*(store.get_task_and_position(i) for i in wanted)) == expected


async def test_claims_from_two_processes_never_share_a_task(
    two_stores: tuple[Store, Store],
) -> None:
    first, second = two_stores
    ids = {await queue_task(first) for _ in range(30)}
    claims = await asyncio.gather(
        *(
            store.claim_task(["flux-2-pro"], f"w{i}", 30)
            for i in range(20)
            for store in (first, second)
        )
    )
    claimed = [c.task.task_id for c in claims if c is not None]
    assert len(claimed) == len(set(claimed)) == 30 and set(claimed) == ids


async def test_a_database_refusing_new_connections_is_an_outage_not_a_fault() -> None:
    """Every pooled connection gone and the database refusing new ones: a read is
    StoreUnavailable (what the loops wait out), not the driver's own error."""
    async with fresh_postgres_database() as url:
        store = open_store(url)
        await store.start()
        name = url.rsplit("/", 1)[1]
        admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            with pytest.raises(StoreUnavailable, match="not currently accepting connections"):
                await store.next_callback_at()
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            assert await store.next_callback_at() is None
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
            await store.close()


@dataclasses.dataclass
class RoleStore:
    """A started store connecting as a role of its own, whose connection limit
    `limit` sets, on a database of its own named `name`."""

    store: Store
    name: str
    role: str
    admin: asyncpg.Connection

    async def limit(self, connections: int) -> None:
        await self.admin.execute(f'ALTER ROLE "{self.role}" CONNECTION LIMIT {connections}')

    async def held(self) -> set[int]:
        """The backends of the store's open connections."""
        query = "SELECT pid FROM pg_stat_activity WHERE usename = $1"
        return {row["pid"] for row in await self.admin.fetch(query, self.role)}


@asynccontextmanager
async def store_of_a_role() -> AsyncIterator[RoleStore]:
    """A store whose role's connection limit the test sets (superusers have none)."""
    role = f"fluxserve_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    await admin.execute(f'CREATE ROLE "{role}" LOGIN')
    try:
        async with fresh_postgres_database() as url:
            name = url.rsplit("/", 1)[1]
            await admin.execute(f'ALTER DATABASE "{name}" OWNER TO "{role}"')
            store = open_store(str(sa.engine.make_url(url).set(username=role)))
            await store.start()
            try:
                yield RoleStore(store, name, role, admin)
            finally:
                await store.close()
    finally:
        await admin.execute(f'DROP ROLE "{role}"')
        await admin.close()


async def test_a_database_out_of_connection_slots_is_an_outage_not_a_fault() -> None:
    """Every pooled connection gone and no slot left for a new one (max_connections,
    or the role's limit, reached): a read is StoreUnavailable, not the driver's error."""
    async with store_of_a_role() as limited:
        await limited.limit(0)
        await drop_every_connection(limited.store)
        with pytest.raises(StoreUnavailable, match="too many connections"):
            await limited.store.next_callback_at()
        await limited.limit(-1)
        assert await limited.store.next_callback_at() is None


async def until_a_connection_waits_for_a_lock(name: str, connections: int = 1) -> None:
    """Return once `connections` connections to database `name` wait for rows (or keys)
    others locked."""
    admin = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        for _ in range(1000):
            if (
                await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = $1 AND wait_event_type = 'Lock'",
                    name,
                )
                >= connections
            ):
                return
            await asyncio.sleep(0.01)
    finally:
        await admin.close()
    raise AssertionError(f"{connections} connections did not wait for a lock")


@dataclasses.dataclass
class Paying:
    """A started store on a database of its own (named `name`) where account acct_a
    has credits, and another connection to that database."""

    store: Store
    other: asyncpg.Connection
    name: str


@asynccontextmanager
async def an_account_with_credits(credits: int) -> AsyncIterator[Paying]:
    async with fresh_postgres_database() as url:
        store = open_store(url)
        await store.start()
        other = await asyncpg.connect(url)
        try:
            await open_accounts(store, "a")
            await store.grant_credits("acct_a", credits, None)
            yield Paying(store, other, url.rsplit("/", 1)[1])
        finally:
            await other.close()
            await store.close()


DONE = Outcome("tiny", 7, 1024, 1024, [ResultFile("results/x/i.png", "i.png", "image/png", 10)])


async def test_a_finish_ended_to_break_a_deadlock_is_an_outage_not_a_fault() -> None:
    """Another transaction holds the account's row and then waits for the task's,
    which the finish holds while it waits for the account's: PostgreSQL
    ends the finish. The worker is told StoreUnavailable, which it retries, and its
    next try finishes the task; not the driver's own error."""
    async with an_account_with_credits(10) as paying:
        store, other = paying.store, paying.other
        await store.create_task(dataclasses.replace(of_account("acct_a"), price=5))
        claim = await store.claim_task(["flux-2-pro"], "w1", 30)
        assert claim is not None
        async with other.transaction():
            # Only the finish's side looks for the deadlock soon: it is the one ended.
            await other.execute("SET LOCAL deadlock_timeout = '1h'")
            await other.execute("UPDATE accounts SET held = held WHERE account_id = 'acct_a'")
            finishing = asyncio.create_task(store.finish_task(claim, DONE))
            await until_a_connection_waits_for_a_lock(paying.name)
            task_row = asyncio.create_task(
                other.execute(
                    "UPDATE tasks SET progress = progress WHERE task_id = $1",
                    claim.task.task_id,
                )
            )
            with pytest.raises(StoreUnavailable, match="deadlock"):
                await finishing
            await task_row
        assert await store.finish_task(claim, DONE)
        task = await store.get_task(claim.task.task_id)
        assert task is not None and task.status is TaskStatus.FINISHED


def lose_the_connection_after_the_first_statement(
    monkeypatch: pytest.MonkeyPatch, how: str = "execute"
) -> None:
    """Make the first statement run alone by `how` (`execute`, or `one` for one that
    returns its row) commit, then report its connection lost."""
    run = getattr(_Pooled, how)
    lost = []

    async def lost_after_commit(self: _Pooled, statement: Any, **params: Any) -> Any:
        answer = await run(self, statement, **params)
        if not lost:
            lost.append(statement)
            raise StoreUnavailable("database connection lost: connection was closed")
        return answer

    monkeypatch.setattr(_Pooled, how, lost_after_commit)


UPLOAD = UploadRecord(
    "file_1", "acct_a", "uploads/file_1.png", "cat.png", None, 10, "image/png", None, 1.0, 2.0
)


async def test_rows_whose_connection_was_lost_as_they_were_stored_are_stored_not_refused(
    two_stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statement runs again on a new connection and finds its own row: the
    caller is answered as if the first try had been heard, not refused."""
    store, _ = two_stores
    lose_the_connection_after_the_first_statement(monkeypatch)
    made = await store.create_account("acct_a", "a@example.com")
    assert (made.account_id, made.email) == ("acct_a", "a@example.com")
    lose_the_connection_after_the_first_statement(monkeypatch)
    await store.create_key("key_a", "alice", "h" * 64, "fsk_abcdef", "acct_a")
    key = await store.key_for_hash("h" * 64)
    assert key is not None and key.key_id == "key_a"
    lose_the_connection_after_the_first_statement(monkeypatch)
    await store.add_upload(UPLOAD)
    assert await store.get_upload("file_1") == UPLOAD


async def test_a_revoke_or_a_rotation_whose_connection_was_lost_as_it_committed_answers_as_heard(
    two_stores: tuple[Store, Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run again on a new connection, a revoke finds its key revoked and a rotation its
    secret made: each answers what the first try did, not "no such key" or a second
    rotation that makes the new secret the previous one."""
    store, _ = two_stores
    await store.create_key("key_a", "alice", "h" * 64, "fsk_abcdef", "acct_a")
    lose_the_connection_after_the_first_statement(monkeypatch, "one")
    revoked = await store.revoke_key("key_a")
    assert revoked is not None and revoked.revoked_at is not None
    assert await store.key_for_hash("h" * 64) == revoked
    await store.webhook_secret("key_a", "whsec_old")
    lose_the_connection_after_the_first_statement(monkeypatch)
    rotated = await store.rotate_webhook_secret("key_a", "whsec_new", 500.0)
    assert (rotated.secret, rotated.previous_secret) == ("whsec_new", "whsec_old")


async def test_a_database_out_of_connection_slots_leaves_the_store_its_connections() -> None:
    """A submit needs a connection more than the database has slots for: it is
    StoreUnavailable, and the connections the store holds stay open (each one given
    up would need a slot back), not closed as if the database had restarted."""
    async with store_of_a_role() as limited:
        store = limited.store
        task_id = await queue_task(store)
        before = await limited.held()
        await limited.limit(len(before))
        locker = await asyncpg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/" + limited.name)
        try:
            async with locker.transaction():  # the cancel holds its connection, waiting
                await locker.execute(
                    "UPDATE tasks SET progress = progress WHERE task_id = $1", task_id
                )
                cancelling = asyncio.create_task(store.cancel_task(task_id))
                await until_a_connection_waits_for_a_lock(limited.name)
                with pytest.raises(StoreUnavailable, match="too many connections"):
                    await queue_task(store)
            await cancelling
        finally:
            await locker.close()
        assert before <= await limited.held()


async def test_a_database_that_cannot_be_opened_at_start_is_named_without_its_password(
    postgres_url: str,
) -> None:
    """No such database, or no server at the address: the start says which database
    and why, in one line, its password hidden."""
    url = sa.engine.make_url(postgres_url).set(password="hunter2")
    missing = url.set(database="fluxserve_missing_database")
    no_server = url.set(host="127.0.0.1", port=1)
    for database, why in [
        (missing, 'database "fluxserve_missing_database" does not exist'),
        (no_server, "Connect call failed"),
    ]:
        store = open_store(database.render_as_string(hide_password=False))
        with pytest.raises(StoreOpenFailed) as failed:
            await store.start()
        shown = database.render_as_string(hide_password=True)
        assert str(failed.value).startswith(f"cannot open the database at {shown}: ")
        assert why in str(failed.value) and "hunter2" not in str(failed.value)


async def test_a_statement_waiting_on_a_row_locked_elsewhere_times_out_as_an_outage() -> None:
    """A transaction elsewhere holds the task's row and does not end: a cancel, which
    needs the row, is StoreUnavailable once the statement timeout has passed (the
    API's 503, the loops' next try), not a wait as long as the lock; once the row is
    let go, the same cancel goes through."""
    async with fresh_postgres_database() as url:
        store = open_store(url, postgres_statement_timeout=0.5)
        await store.start()
        locker = await asyncpg.connect(url)
        try:
            task_id = await queue_task(store)
            async with locker.transaction():
                await locker.execute("SELECT 1 FROM tasks WHERE task_id = $1 FOR UPDATE", task_id)
                with pytest.raises(StoreUnavailable, match="statement timeout"):
                    await asyncio.wait_for(store.cancel_task(task_id), 20)
                queued = await store.get_task(task_id)
                assert queued is not None and queued.status is TaskStatus.NOT_STARTED
            cancelled = await store.cancel_task(task_id)
            assert cancelled is not None and cancelled.status is TaskStatus.FAILED
        finally:
            await locker.close()
            await store.close()


async def test_a_wait_for_a_pooled_connection_is_bounded_by_the_statement_timeout() -> None:
    """Every pooled connection is held (a burst far past the pool, transactions that
    stall): one more operation is StoreUnavailable once the statement timeout has
    passed (the API's 503), not a wait in line for as long as they take; once they
    end, it goes through."""
    async with fresh_postgres_database() as url:
        store = open_store(url, postgres_statement_timeout=0.5)
        await store.start()
        assert isinstance(store, SqlStore)
        release = asyncio.Event()
        held = 0

        async def hold_a_connection() -> None:
            nonlocal held
            async with store.db.transaction():
                held += 1
                await release.wait()

        holders = [asyncio.create_task(hold_a_connection()) for _ in range(POOL_SIZE)]
        try:
            await until(lambda: held == POOL_SIZE)
            with pytest.raises(StoreUnavailable, match="timed out"):
                await asyncio.wait_for(store.get_task("task-unified-0-00000000"), 20)
            release.set()
            await asyncio.gather(*holders)
            assert await store.get_task("task-unified-0-00000000") is None
        finally:
            release.set()
            await asyncio.gather(*holders, return_exceptions=True)
            await store.close()


async def test_a_statement_the_network_drops_times_out_as_an_outage() -> None:
    """No answer comes at all (the server's own statement timeout cannot help): the
    client gives up, StoreUnavailable; with the network back, the store works."""
    async with fresh_postgres_database() as url, PostgresProxy(url).serving() as proxy:
        store = open_store(proxy.url, postgres_statement_timeout=0.5)
        await store.start()
        try:
            task_id = await queue_task(store)
            proxy.black_hole = True
            with pytest.raises(StoreUnavailable, match="timed out"):
                await asyncio.wait_for(store.get_task(task_id), 20)
            proxy.black_hole = False
            assert await store.get_task(task_id) is not None
        finally:
            await store.close()


async def test_the_listener_listens_again_after_an_error_of_any_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its LISTEN is answered with a row no PostgreSQL sends (a middlebox's fault): the
    driver's error is none of a database's. The listener logs it and listens again,
    so a submit elsewhere still wakes a waiting worker at once."""
    async with fresh_postgres_database() as url, PostgresProxy(url).serving() as proxy:
        worker_side, api_side = open_store(proxy.url), open_store(url)
        await asyncio.gather(worker_side.start(), api_side.start())
        try:
            proxy.break_next_listen()
            await settle(worker_side)
            broke = [r for r in caplog.records if "LISTEN connection broke" in r.getMessage()]
            assert len(broke) == 1 and broke[0].exc_info is not None
            assert isinstance(broke[0].exc_info[1], asyncpg.exceptions.ProtocolError)
            # The poll fallback is 60 s here: only a NOTIFY can end this wait in time.
            waiting = asyncio.create_task(worker_side.wait_for_task(at_most=60))
            await queue_task(api_side)
            await asyncio.wait_for(waiting, 10)
        finally:
            await worker_side.close()
            await api_side.close()


async def test_a_sweep_and_a_late_finish_of_one_account_both_go_through() -> None:
    """A worker finishes its task after its lease ran out, as the sweeper hands the
    task back and ends another of the same account. The finish locks its task's row,
    then its account's; so does the sweep: neither is ended to break a deadlock, and
    the credits come out exact. (A transaction holding the finish's ledger key makes
    the finish pause between its two rows, where a slow one would.)"""
    async with an_account_with_credits(100) as paying:
        store, other = paying.store, paying.other
        for _ in range(2):
            await store.create_task(dataclasses.replace(of_account("acct_a"), price=5))
        late = await store.claim_task(["flux-2-pro"], "w1", 0)
        lost = await store.claim_task(["flux-2-pro"], "w2", 0)
        assert late is not None and lost is not None
        await store.cancel_task(lost.task.task_id)  # ends, as cancelled, at the sweep
        await other.execute("BEGIN")
        await other.execute(
            "INSERT INTO credit_ledger (account_id, task_id, kind, amount, created_at) "
            "VALUES ('acct_a', $1, 'charge', -5, 0)",
            late.task.task_id,
        )
        finishing = asyncio.create_task(store.finish_task(late, DONE))
        await until_a_connection_waits_for_a_lock(paying.name)
        sweeping = asyncio.create_task(store.requeue_expired(3))
        await until_a_connection_waits_for_a_lock(paying.name, 2)
        await other.execute("ROLLBACK")
        assert await finishing
        assert await sweeping == (0, 1)
        finished = await store.get_task(late.task.task_id)
        cancelled = await store.get_task(lost.task.task_id)
        assert finished is not None and finished.status is TaskStatus.FINISHED
        assert cancelled is not None and cancelled.status is TaskStatus.FAILED
        account = await store.get_account("acct_a")
        assert account is not None and (account.balance, account.held) == (95, 0)
