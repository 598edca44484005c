"""Realtime wake-ups for the REST transport: a Broadcast doorbell on the private topic `coding_jobs`.

Why Broadcast from a trigger, not postgres_changes on coding_jobs:
- It is a doorbell, not the payload. The migration's statement trigger sends one small message per queue and
  INSERT statement ({"queue", "run_at"}), so an enqueue of 500 jobs rings once, and no row (prompts, user ids)
  leaves the database. postgres_changes sends every inserted row, whole, to every subscriber.
- It costs the database less. postgres_changes needs coding_jobs in the `supabase_realtime` publication, so
  Realtime decodes every change of the table (each job is updated at least twice, by its claim and its ack)
  and checks it against each subscriber; Supabase's docs call Broadcast the method that scales.
- The topic is private: only a key that passes Realtime Authorization (the service role bypasses row-level
  security on realtime.messages) can join, so anon users cannot watch the queue.
- On plain PostgreSQL there is no realtime.send; the trigger checks at run time and does nothing.

The Python Realtime client is asyncio-only, gives up for good after its retries, and does not replay missed
messages. So the doorbell runs it in its own thread with its own event loop, with the client's own reconnects
turned off: any failure (connect refused, socket closed, channel error, join timeout) ends that client, and
the doorbell builds a fresh one after a backoff. Every successful (re)subscribe rings `ring(None, 0)`, so the
consumer claims whatever arrived while no one was listening. Polling stays on underneath: Realtime is a hint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from typing import Any
from urllib.parse import urlsplit

from loguru import logger
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates
from realtime.types import BroadcastPayload, RealtimeChannelOptions

from broker.transport import CancelCallback, Doorbell, RingCallback, ring_due_at_ms

#: The Broadcast topic the migration's trigger sends to (the wire topic is `realtime:coding_jobs`).
TOPIC = "coding_jobs"
#: The Broadcast event name of a doorbell ring.
RING_EVENT = "ring"
#: The Broadcast event asking the holder of a job ({"job": <id>}) to stop it.
CANCEL_EVENT = "cancel"
#: Seconds before the first rebuild after a failure; doubled per failure up to the maximum.
INITIAL_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
#: Seconds a connect or a channel join may take.
JOIN_TIMEOUT_S = 10
#: Seconds between Phoenix heartbeats (the client never sends them more often than every 15 s).
HEARTBEAT_S = 25
#: Seconds stop() waits for the thread.
STOP_TIMEOUT_S = 5.0


def realtime_url(supabase_url: str) -> str:
    """The Realtime endpoint of a Supabase project URL, as supabase-py derives it (plus /websocket)."""
    return f"{supabase_url.rstrip('/')}/realtime/v1"


def _where(url: str) -> str:
    # For log lines: the host only. The client puts the key in the websocket URL's query string.
    return urlsplit(url).netloc


class RealtimeDoorbell(Doorbell):
    """Rings on each Broadcast `ring` of its topic and after each (re)subscribe; rebuilt on failure."""

    def __init__(
        self,
        supabase_url: str,
        api_key: str,
        *,
        topic: str = TOPIC,
        initial_backoff_s: float = INITIAL_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        join_timeout_s: int = JOIN_TIMEOUT_S,
    ) -> None:
        self._url = realtime_url(supabase_url)
        self._api_key = api_key
        self.topic = topic
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.join_timeout_s = join_timeout_s
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._cancel: CancelCallback | None = None

    def start(self, ring: RingCallback, cancel: CancelCallback | None = None) -> None:
        self._cancel = cancel
        _quiet_websockets_client()
        self._thread = threading.Thread(target=self._main, args=(ring,), name="queue-realtime", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(wake.set)
        if self._thread is not None:
            self._thread.join(timeout=STOP_TIMEOUT_S)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _main(self, ring: RingCallback) -> None:
        try:
            asyncio.run(self._supervise(ring))
        except Exception:  # never let the thread die with a traceback; polling goes on regardless
            logger.exception("Realtime doorbell stopped after an unexpected error; polling continues")

    async def _supervise(self, ring: RingCallback) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        backoff = self.initial_backoff_s
        while not self._stopping.is_set():
            if await self._run_one_client(ring):
                backoff = self.initial_backoff_s
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            backoff = min(backoff * 2, self.max_backoff_s)

    async def _run_one_client(self, ring: RingCallback) -> bool:
        """Connect, join and listen until this client fails or stop() is called; True if it subscribed."""
        assert self._wake is not None
        ended = asyncio.Event()
        subscribed = False

        def on_state(state: RealtimeSubscribeStates, error: Exception | None) -> None:
            nonlocal subscribed
            if state is RealtimeSubscribeStates.SUBSCRIBED:
                subscribed = True
                logger.info("Realtime subscribed to {} on {}", self.topic, _where(self._url))
                _ring(ring, None, 0)  # messages sent while we were away are not replayed: look once
            else:
                logger.warning(
                    "Realtime channel {}: {}", state.value, self._redact(error) if error else "no detail"
                )
                ended.set()

        def on_ring(message: BroadcastPayload) -> None:
            payload: dict[str, Any] = message.get("payload") or {}
            try:
                queue, run_at = str(payload["queue"]), ring_due_at_ms(payload)
            except (KeyError, TypeError, ValueError):
                queue, run_at = None, 0
            _ring(ring, queue, run_at)

        client = AsyncRealtimeClient(
            self._url,
            token=self._api_key,
            auto_reconnect=False,
            hb_interval=HEARTBEAT_S,
            timeout=self.join_timeout_s,
        )
        options: RealtimeChannelOptions = {
            "config": {
                "broadcast": {"ack": False, "self": False},
                "presence": {"key": "", "enabled": False},
                "private": True,  # Realtime Authorization decides who may join
            }
        }

        def on_cancel(message: BroadcastPayload) -> None:
            payload: dict[str, Any] = message.get("payload") or {}
            if self._cancel is not None and payload.get("job"):
                try:
                    self._cancel(str(payload["job"]))
                except Exception:
                    logger.exception("Realtime cancel callback failed")

        channel = client.channel(self.topic, options)
        channel.on_broadcast(RING_EVENT, on_ring)
        channel.on_broadcast(CANCEL_EVENT, on_cancel)
        stopping = asyncio.ensure_future(self._wake.wait())
        try:
            # The join waits for the server's reply (or its own timeout); stop() must not wait for either.
            joining = asyncio.ensure_future(
                asyncio.wait_for(channel.subscribe(on_state), self.join_timeout_s + 1)
            )
            await asyncio.wait({joining, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not joining.done():
                joining.cancel()
            elif subscribed and not stopping.done():
                await self._until_dead(client, ended, stopping)
            elif not subscribed:
                joining.result()  # a failed connect raises here
        except Exception as exc:
            logger.warning("Realtime connection to {} failed: {}", _where(self._url), self._redact(exc))
        finally:
            stopping.cancel()
            try:
                await client.close()
            except Exception as exc:
                logger.debug("Realtime client close failed: {}", self._redact(exc))
        return subscribed

    async def _until_dead(
        self, client: AsyncRealtimeClient, ended: asyncio.Event, stopping: asyncio.Future[Any]
    ) -> None:
        """Wait for a channel error or close, for stop(), or for the client's reader task to end.

        The reader (a private attribute) is watched too: if it ends without reporting the channel errored
        (an exception inside the client's error handling), this client is dead all the same.
        """
        waits: set[asyncio.Future[Any]] = {stopping, asyncio.ensure_future(ended.wait())}
        reader = getattr(client, "_listen_task", None)
        if isinstance(reader, asyncio.Task):
            waits.add(reader)
        done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if reader in done and not reader.cancelled() and (error := reader.exception()) is not None:
            logger.warning("Realtime client stopped reading: {}", self._redact(error))
        for waiter in pending - {stopping, reader}:
            waiter.cancel()

    def _redact(self, exc: BaseException) -> str:
        # websockets errors may quote the URL, and the client carries the key in its query string.
        return f"{type(exc).__name__}: {exc}".replace(self._api_key, "<redacted>")


def _quiet_websockets_client() -> None:
    # At DEBUG, websockets logs the handshake URL (the client puts the key in its query string) and the frames
    # (the join carries the key as access_token). Keep that logger at INFO or above, whatever the root level.
    websockets_client = logging.getLogger("websockets.client")
    if websockets_client.getEffectiveLevel() < logging.INFO:
        websockets_client.setLevel(logging.INFO)


def _ring(ring: RingCallback, queue: str | None, run_at_ms: int) -> None:
    try:
        ring(queue, run_at_ms)
    except Exception:
        logger.exception("Realtime ring callback failed")
