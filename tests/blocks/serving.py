"""A block server attached to a real listening Host in this process, and a client Host that
knows its address: the in-process setup of the server's RPC tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from blocks.server import BlockServer
from overlay.host import Host


@contextlib.asynccontextmanager
async def served_in_process(server: BlockServer) -> AsyncIterator[tuple[Host, Host]]:
    """Yields (server host, client host); closes the client, the server, then its host."""
    host, client = Host(), Host()
    [addr] = await host.listen("/ip4/127.0.0.1/tcp/0")
    server.attach(host)
    client.add_peer_addrs(host.peer_id, [addr])
    try:
        yield host, client
    finally:
        await client.close()
        await server.close()
        await host.close()
