"""The bot's own Kalandra account is one the bridge made (issue 11), against the real bridge
process and Synapse, SQLite and PostgreSQL.

Someone able to make accounts (an operator, or anyone with database or admin access) creates
``kalandrabot`` and keeps a device token for it before the bridge first starts. Adopting it
would make that person the bot (their token opens its sessions once the bridge binds nothing
else, and native members add the bridge to their rooms by that name). The bridge refuses to
start, says why in its log (no traceback), and touches nothing: the account stays unbound, no
token is issued, no bot identity is stored. Once the operator has deleted that account, the
bridge makes its own and works.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import sqlalchemy as sa
from matrix.bridge_stack import (
    DATABASES,
    BridgeStack,
    bot_notices,
    bridge_stack,
    nio_client,
    open_dm,
    sync_until,
)
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.bot import BOT_MEMBER_NAME
from kalandra_core.storage import schema as db
from kalandra_core.storage.sql import SqlStore
from kalandra_core.storage.urls import sqlalchemy_url

REFUSED = 13  # the bridge's exit status when its bot cannot start (bridge/app.py)


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=DATABASES)
async def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[BridgeStack]:
    work = tmp_path_factory.mktemp("botidentity")
    async with bridge_stack(work, request.param, start=False) as stack:
        yield stack


async def sql(stack: BridgeStack, statement: sa.Executable) -> int:
    """A count (SELECT) or the rows a DELETE touched."""
    engine = create_async_engine(sqlalchemy_url(stack.store_url))
    try:
        async with engine.begin() as conn:
            result = await conn.execute(statement)
            return int(result.scalar() or 0) if result.returns_rows else result.rowcount
    finally:
        await engine.dispose()


def count(table: sa.TableClause, where: sa.ColumnElement[bool]) -> sa.Select[int]:
    return sa.select(sa.func.count()).select_from(table).where(where)


@pytest.mark.asyncio(loop_scope="module")
async def test_an_account_named_like_the_bot_made_by_someone_else_is_not_adopted(
    stack: BridgeStack,
) -> None:
    store = await SqlStore.open(stack.store_url)  # the schema, as the bridge would make it
    try:
        planted = await store.create_member(BOT_MEMBER_NAME)
        planter_token = await store.issue_token(planted.member_id)
    finally:
        await store.close()

    stack.start_bridge()
    assert stack.bridge is not None
    assert await asyncio.to_thread(stack.bridge.wait, 120) == REFUSED
    log = stack.log.read_text(errors="replace")
    assert "Cannot start the bridge's bot" in log, log[-3000:]
    assert f"member {planted.member_id}) is not one this bridge made" in log, log[-3000:]

    # Nothing was taken over, issued or stored.
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        account = await store.get_member(planted.member_id)
        assert account is not None
        assert account.signature_key is None
        assert await store.authenticate(planter_token) == planted.member_id
    finally:
        await store.close()
    tokens = db.device_tokens
    assert await sql(stack, count(tokens, tokens.c.member_id == planted.member_id)) == 1
    state = sa.table("bridge_client_state", sa.column("owner"))
    assert await sql(stack, count(state, state.c.owner == "bot")) == 0

    # The operator deletes that account: the bridge makes its own, and answers.
    await sql(stack, sa.delete(tokens).where(tokens.c.member_id == planted.member_id))
    assert await sql(stack, sa.delete(db.members).where(db.members.c.name == BOT_MEMBER_NAME))
    await stack.restart()
    store = await SqlStore.open(stack.store_url, migrate=False)
    try:
        bot = await store.find_member(BOT_MEMBER_NAME)
        assert bot is not None
        assert bot.member_id != planted.member_id
        assert bot.signature_key is not None  # bound by the bridge when it made the account
        assert await store.authenticate(planter_token) is None
    finally:
        await store.close()
    async with nio_client(stack.synapse, stack.user) as alice:
        dm = await open_dm(alice)
        notices = bot_notices(alice, dm)
        await sync_until(alice, lambda: bool(notices), "the bot's welcome")
