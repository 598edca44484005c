"""The Supabase REST transport: the queue's SQL functions called through supabase-py, over HTTPS only.

Every operation is one `client.rpc(name, params).execute()`: one HTTP request, one PostgREST transaction. No
row lock outlives a request, so a claim is held by its lease columns (`lease_expires_at`, `claim_token`): a
claim whose reply is lost after the commit stays `processing` until its lease expires, then
the rescue (`rescue_jobs()`, run by every worker's heartbeat) returns it; a late complete/retry from the lost
holder is refused by its token. A claim carries a token the worker chose, so a claim repeated after a lost
reply answers the same jobs instead of claiming more.

Sharp edges of supabase-py 2.x, and what this module does about them:
- postgrest-py truncates a numeric timeout to whole seconds (`int(abs(timeout))` in SyncPostgrestClient) and
  builds an HTTP/2 client of its own. We pass our own httpx.Client instead, with an httpx.Timeout.
- That client speaks HTTP/1.1: a sync httpx client with `http2=True` shared by threads corrupts its h2 state
  (pydantic/httpx2#1153 "Serialize h2 state machine access for thread-safe HTTP/2 connections", still open;
  iiasa/ixmp4#224 saw the same KeyErrors and protocol errors from a shared `Client(http2=True)`), and
  supabase-py's users report "Server disconnected" on reused HTTP/2 connections (supabase/supabase-py#1064).
  Worker threads share this client, so HTTP/1.1 with a connection pool sized for them.
- postgrest-py retries only GET and HEAD, never the POSTs we send; its retry is turned off so nothing sleeps
  behind our back. A lost connection, a timeout or a 5xx becomes ConnectionClosed and Dramatiq decides.
- No session persistence and no token refresh: the service role key is not a user session.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
from postgrest import APIError
from pydantic import SecretStr
from supabase import Client, ClientOptions, create_client

from broker.errors import ConnectionClosed
from broker.operations import SqlArg
from broker.operator_records import parse_time
from broker.realtime import RealtimeDoorbell
from broker.rest_errors import RestCallFailed, raise_for_rest_status, translate
from broker.transport import (
    Claim,
    ClaimedJob,
    Doorbell,
    HeartbeatReply,
    NewJob,
    PresenceListener,
    PresencePolicy,
    QueueStat,
    Transport,
    WorkerInfo,
)

#: Seconds an RPC may take, reply included, before it counts as a lost connection.
DEFAULT_TIMEOUT_S = 10.0
#: Seconds to open a connection to the API.
DEFAULT_CONNECT_TIMEOUT_S = 5.0
#: Connections kept to the API; each worker thread holds at most one at a time.
DEFAULT_MAX_CONNECTIONS = 16
#: Connections beyond the worker threads: the consumer, lease extension, the readiness probe's neighbours.
SPARE_CONNECTIONS = 4
#: Over HTTP a worker cannot hold a session: it heartbeats every 4 s and counts as dead after 20 s of silence,
#: so a dead worker's jobs are back within about 25 s.
REST_PRESENCE = PresencePolicy(mode="heartbeat", heartbeat_interval_s=4.0, stale_after_ms=20_000)


def _http_client(timeout_s: float, connect_timeout_s: float, max_connections: int) -> httpx.Client:
    return httpx.Client(
        http2=False,
        timeout=httpx.Timeout(timeout_s, connect=min(connect_timeout_s, timeout_s)),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        follow_redirects=False,
        event_hooks={"response": [raise_for_rest_status]},
    )


def _supabase_client(url: str, key: SecretStr, http: httpx.Client) -> Client:
    options = ClientOptions(
        persist_session=False,
        auto_refresh_token=False,
        httpx_client=http,
        postgrest_client_retry=False,
    )
    client = create_client(url, key.get_secret_value(), options)
    client.postgrest  # noqa: B018 -- built now, once, not lazily by the first worker threads racing for it
    return client


def _claims(claims: Sequence[Claim]) -> dict[str, list[str]]:
    return {"p_job_ids": [c.job_id for c in claims], "p_claim_tokens": [c.claim_token for c in claims]}


class RestTransport(Transport):
    """The queue through a Supabase project's REST API (PostgREST), with Realtime Broadcast wake-ups."""

    def __init__(
        self,
        url: str,
        service_role_key: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        http_client: httpx.Client | None = None,
        realtime: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self._key = SecretStr(service_role_key)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.realtime = realtime
        self._owns_http = http_client is None
        if http_client is None:
            http_client = _http_client(timeout_s, connect_timeout_s, max_connections)
        elif raise_for_rest_status not in http_client.event_hooks["response"]:
            hooks = http_client.event_hooks
            http_client.event_hooks = {
                "request": hooks["request"],
                "response": [*hooks["response"], raise_for_rest_status],
            }
        self._http = http_client
        self._client = _supabase_client(self.url, self._key, self._http)
        # Readiness has its own client: a probe must not queue behind busy worker threads for a connection.
        self._probe_lock = threading.Lock()
        self._probe: tuple[float, httpx.Client, Client] | None = None

    def _rpc(
        self,
        function: str,
        params: dict[str, Any] | None = None,
        client: Client | None = None,
        *,
        idempotent: bool = True,
    ) -> Any:
        """One RPC. Calls a repeat cannot apply twice (fenced by claim tokens or ids) are tried once more when
        the connection was lost: a dropped keep-alive connection is routine, not an outage."""
        attempts = 2 if idempotent else 1
        for attempt in range(1, attempts + 1):
            try:
                return (client or self._client).rpc(function, params or {}).execute().data
            except (httpx.TransportError, RestCallFailed, APIError) as exc:
                error = translate(function, exc)
                if isinstance(error, ConnectionClosed) and attempt < attempts:
                    continue
                raise error from None
        raise AssertionError("unreachable")

    def check_schema(self) -> None:
        # One function of the first migration and one of the latest: both answer when the schema is current.
        self._rpc("queue_ping")
        self._rpc("get_queue_consumers")

    def enqueue(self, jobs: Sequence[NewJob]) -> int:
        if not jobs:
            return 0
        # Ids make a repeat harmless: a message id seen before is ignored.
        return int(self._rpc("enqueue_jobs", {"p_jobs": [job.as_json() for job in jobs]}))

    def enqueue_unique(self, job: NewJob) -> str:
        return str(self._rpc("enqueue_unique_job", {"p_job": job.as_json()}))

    def claim(
        self, worker_id: str, queue_name: str, limit: int, lease_ms: int, claim_token: str
    ) -> list[ClaimedJob]:
        params = {
            "p_worker_id": worker_id,
            "p_queue": queue_name,
            "p_limit": limit,
            "p_lease_ms": lease_ms,
            "p_claim_token": claim_token,
        }
        return [ClaimedJob.from_row(row) for row in self._rpc("claim_jobs", params)]

    def complete_many(self, claims: Sequence[Claim]) -> set[str]:
        if not claims:
            return set()
        return {str(job_id) for job_id in self._rpc("complete_jobs", _claims(claims))}

    def retry(self, claim: Claim, delay_ms: int, error: str, options: dict[str, Any]) -> bool:
        params = {
            "job_id": claim.job_id,
            "p_claim_token": claim.claim_token,
            "p_delay_ms": delay_ms,
            "error_msg": error,
            "p_options": options,
        }
        return bool(self._rpc("retry_job", params))

    def dead_letter(self, claim: Claim, error: str) -> bool:
        params = {"job_id": claim.job_id, "p_claim_token": claim.claim_token, "error_msg": error}
        return bool(self._rpc("dead_letter_job", params))

    def release(self, claims: Sequence[Claim]) -> int:
        return int(self._rpc("release_jobs", _claims(claims))) if claims else 0

    def cancel_held(self, claims: Sequence[Claim]) -> set[str]:
        if not claims:
            return set()
        return {str(job_id) for job_id in self._rpc("cancel_held_jobs", _claims(claims))}

    def postpone(self, claim: Claim, delay_ms: int, note: str, options: dict[str, Any] | None) -> bool:
        params = {
            "job_id": claim.job_id,
            "p_claim_token": claim.claim_token,
            "p_delay_ms": delay_ms,
            "p_note": note,
            "p_options": options,
        }
        return bool(self._rpc("postpone_job", params))

    def presence_policy(self) -> PresencePolicy:
        return REST_PRESENCE

    def register_worker(self, worker: WorkerInfo, policy: PresencePolicy) -> None:
        if policy.mode != "heartbeat":
            raise ValueError("over the REST API a worker can only heartbeat")
        params = {
            "p_worker_id": worker.worker_id,
            "p_presence": policy.mode,
            "p_stale_after_ms": policy.stale_after_ms,
            "p_hostname": worker.hostname,
            "p_pid": worker.pid,
            "p_queues": list(worker.queues),
            "p_concurrency": worker.concurrency,
        }
        self._rpc("register_worker", params)

    def heartbeat(
        self,
        worker_id: str,
        claims: Sequence[Claim],
        *,
        lease_ms: int | None,
        queues: Sequence[str],
        max_rescues: int,
    ) -> HeartbeatReply:
        params = {
            "p_worker_id": worker_id,
            **_claims(claims),
            "p_lease_ms": lease_ms,
            "p_queues": list(queues),
            "p_max_rescues": max_rescues,
        }
        rows = self._rpc("worker_heartbeat", params)
        row = rows[0] if isinstance(rows, list) else rows
        return HeartbeatReply(
            registered=bool(row["registered"]),
            held=frozenset(str(job_id) for job_id in row["held"] or ()),
            rescued=int(row["rescued"] or 0),
            cancel_requested=frozenset(str(job_id) for job_id in row.get("cancel_requested") or ()),
        )

    def deregister_worker(self, worker_id: str) -> None:
        self._rpc("deregister_worker", {"p_worker_id": worker_id})

    def rescue(self, max_rescues: int) -> int:
        return int(self._rpc("rescue_jobs", {"p_max_rescues": max_rescues}))

    def purge(self, queue_name: str) -> int:
        return int(self._rpc("purge_queue", {"p_queue": queue_name}))

    def stats(self) -> list[QueueStat]:
        return [
            QueueStat(
                queue_name=row["queue_name"],
                status=str(row["status"]),
                jobs=int(row["jobs"]),
                oldest_created_at=parse_time(row["oldest_created_at"]),
                next_run_at=parse_time(row["next_run_at"]),
                oldest_due_at=parse_time(row.get("oldest_due_at")),
            )
            for row in self._rpc("get_queue_stats")
        ]

    def consumers(self) -> dict[str, int]:
        return {row["queue_name"]: int(row["workers"]) for row in self._rpc("get_queue_consumers")}

    def _call_function(self, name: str, args: Mapping[str, SqlArg]) -> list[dict[str, Any]]:
        rows = self._rpc(name, {key: arg.value for key, arg in args.items()})
        return list(rows) if isinstance(rows, list) else [rows]

    def ping(self, timeout_s: float) -> None:
        self._rpc("queue_ping", client=self._probe_client(timeout_s), idempotent=False)

    def _probe_client(self, timeout_s: float) -> Client:
        with self._probe_lock:
            if self._probe is None or self._probe[0] != timeout_s:
                if self._probe is not None:
                    self._probe[1].close()
                http = _http_client(timeout_s, min(self.connect_timeout_s, timeout_s), max_connections=1)
                self._probe = (timeout_s, http, _supabase_client(self.url, self._key, http))
            return self._probe[2]

    def doorbell(
        self, worker: WorkerInfo | None = None, presence: PresenceListener | None = None
    ) -> Doorbell | None:
        return RealtimeDoorbell(self.url, self._key.get_secret_value()) if self.realtime else None

    def close(self) -> None:
        if self._owns_http:
            self._http.close()
        with self._probe_lock:
            if self._probe is not None:
                self._probe[1].close()
                self._probe = None
