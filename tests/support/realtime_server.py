"""A minimal Supabase Realtime stand-in: the Phoenix channel protocol (vsn 1.0.0) over a local websocket.

It speaks what the `realtime` client in .venv sends and expects (realtime/_async/client.py, channel.py,
push.py and message.py): JSON frames {topic, event, payload, ref, join_ref}; `heartbeat` on topic `phoenix`
and `phx_join` / `phx_leave` on `realtime:<topic>` are answered with `phx_reply` {status, response}; a
Broadcast reaches every joined connection as event `broadcast` with {type, event, payload, meta} and a null
ref. The handshake is at `/realtime/v1/websocket?apikey=...&vsn=1.0.0`, as supabase-py derives it; a join
must carry the expected key as `access_token` (Realtime Authorization stand-in) or is refused.

The server runs its own event loop in a thread. It can be stopped (connections closed with 1001 Going Away),
started again on the same port, or have its connections cut without a close frame (`drop_connections`).
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

SOCKET_PATH = "/realtime/v1/websocket"
#: Seconds a call into the server's loop may take.
CALL_TIMEOUT_S = 5.0


class RealtimeServer:
    """A Phoenix-channel websocket endpoint on 127.0.0.1; `url` is the Supabase project URL reaching it."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.port = 0
        self.joins = 0  # successful joins, over every start
        self.refused_joins = 0
        self.refuse_joins = False  # answer every join with an error, as Realtime does for a bad token
        self.versions: list[str] = []  # the `vsn` of each handshake
        self._changed = threading.Condition()
        self._topics: dict[ServerConnection, set[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen (again) on the same port; the first start picks a free one."""
        started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, args=(self._loop, started), daemon=True)
        self._thread.start()
        if not started.wait(CALL_TIMEOUT_S):
            raise TimeoutError("the Realtime stand-in did not start")

    def stop(self) -> None:
        """Close the server and its connections (1001 Going Away) and end its thread."""
        if self._loop is None or self._thread is None:
            return
        self._call(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CALL_TIMEOUT_S)
        self._loop.close()
        self._loop = self._thread = None

    def drop_connections(self) -> None:
        """Cut every connection without a close frame, as a network failure does; the server still listens."""

        async def abort() -> None:
            for connection in list(self._topics):
                connection.transport.abort()

        self._call(abort())

    def broadcast(self, event: str, payload: dict[str, Any], topic: str = "coding_jobs") -> int:
        """Send a Broadcast to every connection joined to `topic`; returns how many got it."""

        async def send() -> int:
            frame = {
                "topic": f"realtime:{topic}",
                "event": "broadcast",
                "payload": {
                    "type": "broadcast",
                    "event": event,
                    "payload": payload,
                    "meta": {"id": str(uuid.uuid4())},
                },
                "ref": None,
            }
            targets = [c for c, topics in self._topics.items() if f"realtime:{topic}" in topics]
            for connection in targets:
                await connection.send(json.dumps(frame))
            return len(targets)

        return int(self._call(send()))

    def wait_for_joins(self, count: int, timeout_s: float, *, refused: bool = False) -> bool:
        """Wait until `count` joins have succeeded (or been refused) since the server was made."""
        with self._changed:
            return self._changed.wait_for(
                lambda: (self.refused_joins if refused else self.joins) >= count, timeout=timeout_s
            )

    def _call(self, coroutine: Any) -> Any:
        assert self._loop is not None, "the Realtime stand-in is not running"
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CALL_TIMEOUT_S)

    def _run(self, loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(self._open())
        self.port = next(iter(self._server.sockets)).getsockname()[1]
        started.set()
        loop.run_forever()

    async def _open(self) -> Server:
        return await serve(self._handle, "127.0.0.1", self.port, process_request=self._check_handshake)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def _check_handshake(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        query = parse_qs(url.query)
        self.versions.append((query.get("vsn") or [""])[0])
        if url.path != SOCKET_PATH:
            return connection.respond(404, "Not Found\n")
        if (query.get("apikey") or [""])[0] != self.api_key:
            return connection.respond(403, "Forbidden\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        self._topics[connection] = set()
        try:
            async for raw in connection:
                frame = json.loads(raw)
                await self._answer(connection, frame)
        except ConnectionClosed:
            pass
        finally:
            self._topics.pop(connection, None)

    async def _answer(self, connection: ServerConnection, frame: dict[str, Any]) -> None:
        topic, event, payload = str(frame.get("topic")), frame.get("event"), frame.get("payload") or {}
        status, response = "ok", dict[str, Any]()
        if event == "phx_join":
            if self.refuse_joins or payload.get("access_token") != self.api_key:
                status, response = "error", {"reason": "Unauthorized: the access token may not join"}
            else:
                self._topics[connection].add(topic)
                response = {"postgres_changes": []}
            with self._changed:
                if status == "ok":
                    self.joins += 1
                else:
                    self.refused_joins += 1
                self._changed.notify_all()
        elif event == "phx_leave":
            self._topics[connection].discard(topic)
        elif event not in ("heartbeat", "access_token"):
            status, response = "error", {"reason": f"unknown event {event}"}
        if event == "access_token":
            return  # Realtime answers token refreshes with nothing
        reply = {
            "topic": topic,
            "event": "phx_reply",
            "payload": {"status": status, "response": response},
            "ref": frame.get("ref"),
            "join_ref": frame.get("join_ref"),
        }
        await connection.send(json.dumps(reply))
