"""The I/O driver of a server's placement: reads the swarm from the DHT on the planner's
schedule, and carries out the moves it decides (blocks/rebalancing.py decides; this only
sleeps, reads, loads and announces).

A move, without dropping the sessions the server can finish:
1. announce JOINING for the new span (the old span's other blocks stay ONLINE: it still
   serves them), so servers checking meanwhile count us at our destination; a moment later
   look again and give way to a contender with a smaller peer id (rebalancing.py, rule 4);
2. load the new span (only its tensors) on a loader thread while the old one keeps serving;
   if that fails, withdraw the JOINING records and stay;
3. switch: new sessions and forwards go to the new span; announce it ONLINE and the blocks
   left behind OFFLINE, so clients stop routing new work there at once;
4. sessions already open on the old span run on until they end or the grace deadline, then
   the rest are closed (their clients recover elsewhere) and the old span's memory is freed.
Both spans are resident between 2 and 4: a server whose memory holds only one span should be
started with `--handover-grace 0` and a smaller `--num-blocks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Callable

from blocks.announcement import ServerState
from blocks.rebalancing import CONTENTION_WAIT, Move, SpanPlanner, placement_infos
from blocks.swarm_reader import read_view

log = logging.getLogger(__name__)

DRAIN_POLL = 0.5  # seconds between looks at the old span's sessions during a handover


class Balancer:
    def __init__(self, planner: SpanPlanner, dht, announcer, server,
                 load_span: Callable[[int, int], object], num_blocks: int,
                 contention_wait: float = CONTENTION_WAIT):
        self.planner = planner
        self.dht = dht
        self.announcer = announcer
        self.server = server
        self.load_span = load_span  # (start, end) -> BlockSpan; runs on a loader thread
        self.num_blocks = num_blocks
        self.contention_wait = contention_wait
        self.moving = False

    async def run(self) -> None:
        """Check on the planner's schedule until cancelled (at once if rebalancing is off)."""
        loop = asyncio.get_running_loop()
        while True:
            at = self.planner.next_check(loop.time())
            if at is None:
                return
            await asyncio.sleep(max(0.0, at - loop.time()))
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a DHT hiccup or a failed move: try again next period
                log.exception("balance check failed; the server keeps its span")

    async def check_once(self) -> Move | None:
        """Read the swarm and ask the planner; if it says move, wait the selection delay, read
        again and move only if the planner still says so (two servers that decided at the same
        moment then rarely both move: the later one sees the first one's JOINING records)."""
        loop = asyncio.get_running_loop()
        move = await self._decide()
        if move is None:
            return None
        await asyncio.sleep(max(0.0, self.planner.selection_time(loop.time()) - loop.time()))
        move = await self._decide()
        if move is None:
            log.info("the imbalance is gone on a second look; staying")
            return None
        log.info("swarm is imbalanced: moving from blocks [%d, %d) to [%d, %d)",
                 move.old_start, move.old_end, move.start, move.end)
        await self.move(move)
        return move

    async def _decide(self) -> Move | None:
        view = await read_view(self.dht, self.server.config.model_id, self.num_blocks)
        own = self.announcer.info(ServerState.ONLINE)
        move = self.planner.check(asyncio.get_running_loop().time(), placement_infos(view), own)
        if move is None:
            log.debug("balance check: blocks [%d, %d) stay", own.start, own.end)
        return move

    async def move(self, move: Move) -> bool:
        """Carry out `move`; False (still serving the old span) if it gave way to another
        server or could not load the new span."""
        self.moving = True
        try:
            span = await self._prepare(move)
            if span is None:
                return False
            await self._hand_over(move, span)
            return True
        finally:
            self.moving = False

    async def _prepare(self, move: Move):
        """Steps 1-2: the new span loaded, or None (JOINING records withdrawn)."""
        loop = asyncio.get_running_loop()
        announcer = self.announcer
        announcer.joining = (move.start, move.end)
        try:
            await announcer.announce(ServerState.ONLINE)
            await asyncio.sleep(self.contention_wait)
            view = await read_view(self.dht, self.server.config.model_id, self.num_blocks)
            if self.planner.yields(move, placement_infos(view)):
                log.info("another server is moving to blocks [%d, %d) too; staying",
                         move.start, move.end)
                await announcer.withdraw_joining()
                return None
            return await loop.run_in_executor(None, self.load_span, move.start, move.end)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # out of memory, unreadable files, the DHT: keep the old span
            log.error("cannot move to blocks [%d, %d): %s; staying on [%d, %d)", move.start,
                      move.end, e, move.old_start, move.old_end)
            if announcer.joining is not None:
                with contextlib.suppress(Exception):
                    await announcer.withdraw_joining()
                announcer.joining = None
            return None

    async def _hand_over(self, move: Move, span) -> None:
        """Steps 3-4: serve `span`; the old one once its sessions are done, freed."""
        loop = asyncio.get_running_loop()
        announcer, server = self.announcer, self.server
        old = server.served
        server.switch_span(span)
        del span
        announcer.joining, announcer.leaving = None, old
        try:
            await announcer.announce(ServerState.ONLINE)
        except Exception:  # the refresh loop announces again next period
            log.exception("announcing the new span failed; retrying next period")
        log.info("serving blocks [%d, %d); %d session(s) finishing on [%d, %d)",
                 move.start, move.end, server.old_span_sessions, *old)
        handover = self.planner.handover(move, loop.time())
        try:
            while not handover.old_span_free(loop.time(), server.old_span_sessions):
                await asyncio.sleep(min(DRAIN_POLL, max(0.0, handover.deadline - loop.time())))
        finally:  # also when cancelled (the server stops): nothing stays on the old span
            closed = server.free_old_spans()
            if closed:
                log.info("closed %d session(s) still on blocks [%d, %d)", closed, *old)
            announcer.leaving = None  # its OFFLINE records expire by themselves
            release_memory()


def release_memory() -> None:
    """Give the freed span's memory back (file handles, CUDA cache)."""
    gc.collect()
    import torch  # the server has torch loaded already; the planner modules must not

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
