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

#: How long a whole replay may take before what came is kept and the rest counted as missed.
REPLAY_TIMEOUT_S = 5.0
#: The end marker's sequence number.
END_SEQ = -1


async def replay(
    ctx: zmq.asyncio.Context,
    endpoint: str,
    start: int,
    take: Callable[[int, bytes], None],
    timeout_s: float = REPLAY_TIMEOUT_S,
) -> bool:
    """Hand every buffered batch from ``start`` to ``take(seq, payload)``, in order; True when
    the publisher's end marker came (all it had was sent), False on a timeout or a malformed
    answer (what came before is kept)."""
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.RCVHWM, 0)  # a replay is thousands of messages sent at once
    socket.connect(endpoint)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    try:
        await socket.send_multipart((b"", max(0, start).to_bytes(8, "big")))
        while True:
            left = deadline - loop.time()
            if left <= 0 or not await socket.poll(max(1, int(left * 1000))):
                return False
            frames = await socket.recv_multipart()
            if len(frames) != 4 or frames[0] or len(frames[2]) != 8:
                return False
            seq = int.from_bytes(frames[2], "big", signed=True)
            if seq == END_SEQ:
                return True
            take(seq, frames[3])
    finally:
        socket.close(linger=0)
