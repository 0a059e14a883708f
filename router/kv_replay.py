"""The KV-event batches a subscriber did not receive, asked from the publisher's replay socket.

vLLM's ZmqEventPublisher keeps its last ``buffer_steps`` batches (10,000 by default) and, when
its ``--kv-events-config`` names a ``replay_endpoint``, answers a request ``[b"", start seq]``
on that ROUTER socket with every buffered batch from ``start`` as ``[b"", topic, seq,
payload]``, then an end marker ``[b"", b"", -1, b""]``. The subscriber
(vllm_fleet.router.kv_events) asks it twice over:

- when it subscribes: a block cached before the router subscribed is never stored again while
  it stays cached, so without the history a router started after its replicas (a restart, a
  rolling update, a second router) matched their hot prefixes only approximately until each
  was evicted; the buffer holds that history (as far back as ``buffer_steps`` reaches);
- when the sequence numbers jump: batches lost at the publisher's high-water mark, or
  published while the SUB socket was still joining.

A replay is best effort, as vLLM's is: the ROUTER socket drops what its send queue cannot take
when a long replay outruns it. Our DEALER takes everything into its queue at once (no receive
limit); the caller asks again from a hole (vllm_fleet.router.kv_events.BatchOrder) and counts
what still did not come as missed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq
import zmq.asyncio

#: How long a replay may go without a message before what came is kept and the rest counted
#: as missed (a publisher without a replay socket there, or a dead one), and how long a whole
#: replay may take at most. Idle, not total: 10,000 batches take 1-3 s on a loaded 2-core box.
REPLAY_IDLE_S = 5.0
REPLAY_MAX_S = 60.0
#: The end marker's sequence number.
END_SEQ = -1


async def replay(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    start: int,
    take: Callable[[int, bytes], None],
    idle_s: float = REPLAY_IDLE_S,
) -> tuple[bool, int]:
    """Hand every buffered batch from ``start`` to ``take(seq, payload)``, in order.

    Returns (ended, received): ``ended`` when the publisher's end marker came (all it had
    was sent); not when nothing came for ``idle_s`` (no replay socket there, a dead one, or
    the end marker itself dropped), the replay ran past REPLAY_MAX_S, or an answer was
    malformed. What came before is kept either way."""
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 0)  # a replay is thousands of messages sent at once
    socket.connect(endpoint)
    loop = asyncio.get_running_loop()
    end = loop.time() + REPLAY_MAX_S
    received = 0
    try:
        await socket.send_multipart((b"", max(0, start).to_bytes(8, "big")))
        while True:
            wait = min(idle_s, end - loop.time())
            if wait <= 0 or not await socket.poll(max(1, int(wait * 1000))):
                return False, received
            frames = await socket.recv_multipart()
            if len(frames) != 4 or frames[0] or len(frames[2]) != 8:
                return False, received
            seq = int.from_bytes(frames[2], "big", signed=True)
            if seq == END_SEQ:
                return True, received
            received += 1
            take(seq, frames[3])
    finally:
        socket.close(linger=0)
