"""One attempt on one replica: send, classify what went wrong, count it, release the replica.

A replica's answer is committed to (a Reply) or becomes an UpstreamFailure that names why; the
failure is counted toward the replica's ejection by its kind (router.outliers): gateway
failures toward the breaker, other 5xx answers toward the replica's error rate.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict

from vllm_fleet.router.balancer import RequestInfo
from vllm_fleet.router.bounded_read import read_bounded
from vllm_fleet.router.context import RouterContext
from vllm_fleet.router.health import eject, record_failure, record_success
from vllm_fleet.router.outliers import is_gateway_failure, is_outlier, may_eject, record_answer
from vllm_fleet.router.precise import note_sent
from vllm_fleet.router.progress import first_byte_due_s
from vllm_fleet.router.state import Attempt, ReplicaState
from vllm_fleet.router.upstream_client import ConnectFailed, UpstreamClient, UpstreamResponse

log = logging.getLogger("vllm_fleet.router")


class UpstreamFailure(Exception):
    """One attempt failed before any byte reached the client, so another replica may take it.

    ``reason`` is one of telemetry.REASONS. For a 5xx answer the status and body are kept so
    that, when every attempt fails, the client gets the replica's own error.
    """

    def __init__(
        self,
        replica: str,
        reason: str,
        detail: str,
        *,
        refused: bool = False,
        status: int = 0,
        body: bytes = b"",
        content_type: str = "application/json",
    ) -> None:
        super().__init__(f"{reason}: {detail}")
        self.replica = replica
        self.reason = reason
        self.detail = detail
        self.refused = refused
        self.status = status
        self.body = body
        self.content_type = content_type

    @property
    def gateway(self) -> bool:
        """Does this failure say the replica (not the request) is in trouble?
        (vllm_fleet.router.outliers)"""
        return is_gateway_failure(self.reason, self.status)


@dataclass(slots=True)
class Reply:
    """A replica's answer we committed to. ``body`` is None for a stream still to relay."""

    replica: ReplicaState
    response: UpstreamResponse
    body: bytes | None


def failure_of(replica: str, exc: BaseException) -> UpstreamFailure:
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's ServerTimeoutError is one too
        return UpstreamFailure(replica, "timeout", str(exc) or "no answer in time")
    if isinstance(exc, (ConnectFailed, aiohttp.ClientConnectorError)):
        refused = isinstance(exc.os_error, ConnectionRefusedError)
        return UpstreamFailure(replica, "connect", str(exc.os_error), refused=refused)
    return UpstreamFailure(replica, "disconnect", f"{type(exc).__name__}: {exc}")


async def exchange_with(
    client: UpstreamClient,
    replica: ReplicaState,
    path: str,
    headers: CIMultiDict[str],
    body: bytes,
    idle_s: float,
) -> Reply:
    """POST to the replica; a 5xx is a failure, any other answer a Reply (read whole unless
    it is an event stream). Body reads are bounded by ``idle_s`` (see _read_bounded).
    Redirects go back to the client: following one would send its body outside the fleet."""
    response = await client.post(replica.url, path, headers, body)
    try:
        if response.status >= 500:
            data = await read_bounded(response.read(), idle_s)
            raise UpstreamFailure(
                replica.url,
                "status",
                f"HTTP {response.status}",
                status=response.status,
                body=data,
                content_type=response.headers.get("Content-Type", "application/json"),
            )
        if response.content_type == "text/event-stream":
            return Reply(replica, response, None)
        return Reply(replica, response, await read_bounded(response.read(), idle_s))
    except BaseException:
        response.close()
        raise


class IdleWatchdog:
    """Fails a stream's pending read once it has waited ``idle_s`` seconds for data.

    The same bound as _read_bounded, for the per-chunk loop of a stream: a timeout scope per
    chunk costs a timer handle, a heap push and a cancel per chunk, several microseconds at
    hundreds of chunks per second. Here one timer per stream wakes at most every ``idle_s``
    (--first-byte-timeout, minutes by default) and the loop only notes when each read started.
    The read is failed through the reader itself, which also wakes a read that the parser
    stopped feeding (see _read_bounded). Time spent writing to the client is not counted.
    """

    __slots__ = ("_content", "_handle", "_idle_s", "_loop", "read_since")

    def __init__(
        self, content: aiohttp.StreamReader, idle_s: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._content = content
        self._idle_s = idle_s
        self._loop = loop
        #: Loop time the pending read started; None while no read is pending.
        self.read_since: float | None = None
        self._handle: asyncio.TimerHandle | None = loop.call_at(loop.time() + idle_s, self._check)

    @classmethod
    def of(
        cls, response: UpstreamResponse, idle_s: float, loop: asyncio.AbstractEventLoop
    ) -> IdleWatchdog:
        """The watchdog of a stream being relayed (the client bounds only the wait for the
        head: router.upstream_client)."""
        return cls(response.content, idle_s, loop)

    def _check(self) -> None:
        now = self._loop.time()
        since = self.read_since
        if since is not None and now - since >= self._idle_s:
            self._handle = None
            self._content.set_exception(
                asyncio.TimeoutError(f"no data from the replica for {self._idle_s:g} s")
            )
            return
        self._handle = self._loop.call_at(
            (now if since is None else since) + self._idle_s, self._check
        )

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


async def send_once(
    ctx: RouterContext,
    replica: ReplicaState,
    path: str,
    headers: CIMultiDict[str],
    body: bytes,
    info: RequestInfo | None = None,
) -> Reply:
    """One attempt on ``replica``. On success its in_flight stays counted until finish().

    While it waits for its first byte the attempt is registered on the replica, with the time
    it becomes overdue, so the progress monitor (vllm_fleet.router.progress) can tell a hung replica
    and abandon the attempt: it is then cancelled here (closing the connection makes vLLM drop it)
    and fails as "stalled", which the caller re-sends elsewhere; nothing reached the client.
    """
    task = asyncio.current_task()
    assert task is not None
    now = time.monotonic()
    due = first_byte_due_s(replica, info) if info is not None else MIN_DUE_UNKNOWN_S
    attempt = Attempt(sent_at=now, due_at=now + due, abandon=task.cancel)
    replica.in_flight += 1
    replica.awaiting.add(attempt)
    if info is not None:
        replica.prefixes.record(info.prefix, now)
        if ctx.peers is not None:
            ctx.peers.note(replica.url, info.prefix)
        note_sent(replica, info.blocks)
    try:
        reply = await exchange_with(
            ctx.client, replica, path, headers, body, ctx.config.first_byte_timeout_s
        )
    except UpstreamFailure as exc:
        failure = exc
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        failure = failure_of(replica.url, exc)
    except asyncio.CancelledError:
        if not attempt.abandoned or _still_cancelled(task):
            replica.in_flight -= 1
            raise
        failure = UpstreamFailure(
            replica.url, "stalled", "the replica sent nothing while requests were overdue"
        )
    except BaseException:
        replica.in_flight -= 1
        raise
    else:
        replica.last_byte_at = time.monotonic()
        record_answer(replica.outcomes, replica.last_byte_at, error=False)
        return reply
    finally:
        replica.awaiting.discard(attempt)
    replica.in_flight -= 1
    note_failure(ctx, replica, failure)
    raise failure


#: First-byte due time of an attempt sent without a RequestInfo (none in the proxy today).
MIN_DUE_UNKNOWN_S = 60.0


def _still_cancelled(task: asyncio.Task[object]) -> bool:
    """Undo the progress monitor's cancel; True when someone else cancelled ``task`` too
    (the client went away, or shutdown): that cancellation must go on."""
    if sys.version_info < (3, 11):  # no cancel counting: the monitor's was the only one
        return False
    return task.uncancel() > 0


def note_failure(ctx: RouterContext, replica: ReplicaState, failure: UpstreamFailure) -> None:
    """Count a failed attempt toward the replica's ejection, by what kind of failure it was.

    Gateway failures feed the breaker's consecutive count; any other 5xx answer only the
    replica's error rate (vllm_fleet.router.outliers). Either ejection is capped by
    --max-ejection-percent; a refused connection is not (nothing listens there).
    """
    now = time.monotonic()
    fleet = ctx.fleet
    allowed = may_eject(
        fleet.ejected_count(), len(fleet.replicas), ctx.breaker.max_ejection_percent
    )
    ejected = False
    if failure.refused and replica.check_ok:
        # Nothing listens there: as good as a failed check. Out of rotation (and of panic
        # mode) until its next check passes, which is as soon as it is back.
        replica.check_ok = False
        replica.healthy = False
    if failure.gateway:
        ejected = record_failure(
            replica, now, ctx.breaker, refused=failure.refused, may_eject=allowed
        )
        if (
            not ejected
            and not allowed
            and replica.consecutive_failures >= ctx.breaker.failure_threshold
        ):
            ctx.telemetry.ejections_prevented.inc()
    else:
        replica.last_byte_at = now  # it answered: not hung
        record_answer(replica.outcomes, now, error=True)
        if is_outlier(replica, list(fleet.replicas.values()), now):
            if not allowed:
                ctx.telemetry.ejections_prevented.inc()
            elif eject(replica, now, ctx.breaker, why="5xx rate far above its peers'"):
                ejected = True
                ctx.telemetry.outlier_ejections.inc()
    ctx.telemetry.observe_failure(replica.url, failure.reason)
    log.warning(
        "upstream failed replica=%s reason=%s detail=%s ejected=%s",
        replica.url,
        failure.reason,
        failure.detail,
        ejected,
    )


def finish(reply: Reply, succeeded: bool) -> None:
    """Release the replica: in_flight back down, and a success for the breaker if it was one.

    An upstream response not read to the end (client gone, stream broken) is closed, not
    returned to the pool: closing the connection is what makes vLLM abort the request.
    """
    replica = reply.replica
    replica.in_flight -= 1
    replica.served += 1
    if reply.response.content.is_eof():
        reply.response.release()
    else:
        reply.response.close()
    if succeeded:
        record_success(replica, time.monotonic())
