"""A small PostgREST-compatible RPC endpoint over the test's real PostgreSQL: a stand-in server, not a mock.

It serves only what the queue uses, the way PostgREST documents it:
- Functions as RPC (https://docs.postgrest.org/en/latest/references/api/functions.html): `POST
  /rest/v1/rpc/{fn}` with named JSON arguments; a function is found by name and argument names, none found is
  PGRST202 (404) and more than one is PGRST203 (300); set-returning functions answer a JSON array, scalar ones
  the JSON value, and void ones 204 No Content.
- Authentication (https://docs.postgrest.org/en/latest/references/auth.html): the HS256 JWT in
  `Authorization: Bearer` is verified and its `role` claim is the role the request runs as
  (`set_config('role', ...)` plus `request.jwt.claims`), so the database's grants decide, as they do behind
  PostgREST; no JWT is the anon role.
- Transactions (https://docs.postgrest.org/en/latest/references/transactions.html): one transaction per
  request, read-only for stable and immutable functions, with the impersonated role's `alter role ... set`.
- Errors (https://docs.postgrest.org/en/latest/references/errors.html): the JSON shape {code, details, hint,
  message} and the SQLSTATE-to-HTTP-status table.
- Inserts and upserts into tables (https://docs.postgrest.org/en/latest/references/api/tables_views.html,
  "Insert", "Upsert", "On Conflict"): `POST /rest/v1/{table}` with a JSON object or array; `Prefer:
  return=representation` answers the rows, `resolution=merge-duplicates|ignore-duplicates` adds `ON
  CONFLICT(<on_conflict columns, by default the primary key>) DO UPDATE SET <each posted column> =
  EXCLUDED.<column>` or `DO NOTHING`, the statement PostgREST's QueryBuilder.mutatePlanToQuery builds.
Supabase's API gateway sits in front of PostgREST and refuses requests without a valid `apikey` header; the
endpoint does the same. It connects as `authenticator`, as PostgREST does on Supabase.

Fault hooks for the tests: `faults.drop_after_commit` (commit, then close the socket with no reply),
`faults.fail` (answer an error status without touching the database) and `faults.delay` (commit, then
answer late).
"""

from __future__ import annotations

import collections
import contextlib
import json
import secrets
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import psycopg
from psycopg import sql
from psycopg_pool import ConnectionPool

RPC_PREFIX = "/rest/v1/rpc/"
TABLE_PREFIX = "/rest/v1/"
ANON_ROLE = "anon"
_EXACT_STATUS = {"23503": 409, "23505": 409, "25006": 405, "53400": 500, "P0001": 400}
_EXACT_STATUS |= {"42883": 404, "42P01": 404}
_CLASS_STATUS = {"08": 503, "09": 500, "0L": 403, "0P": 403, "25": 500, "28": 403, "2D": 500, "38": 500}
_CLASS_STATUS |= {"39": 500, "3B": 500, "40": 500, "53": 503, "54": 500, "55": 500, "57": 500, "58": 500}
_CLASS_STATUS |= {"F0": 500, "HV": 500, "P0": 500, "XX": 500}
_COLUMNS_SQL = """
select a.attname, format_type(a.atttypid, a.atttypmod),
       coalesce(a.attnum = any(i.indkey), false) as in_primary_key
  from pg_catalog.pg_attribute a
  left join pg_catalog.pg_index i on i.indrelid = a.attrelid and i.indisprimary
 where a.attrelid = to_regclass(format('public.%%I', %s::text)) and a.attnum > 0 and not a.attisdropped
"""
_FUNCTIONS_SQL = """
select p.proname, p.proretset, p.provolatile, p.pronargdefaults, p.proargmodes::text[] as modes,
       coalesce(p.proargnames, '{}') as names, p.prorettype = 'void'::regtype as returns_void,
       t.typtype = 'c' or p.prorettype = 'record'::regtype as returns_row,
       array(select format_type(a, null) from unnest(p.proargtypes) a) as in_types
  from pg_catalog.pg_proc p
  join pg_catalog.pg_namespace n on n.oid = p.pronamespace
  join pg_catalog.pg_type t on t.oid = p.prorettype
 where n.nspname = 'public' and p.proname = %s and p.prokind = 'f'
"""


def status_for(sqlstate: str, role: str) -> int:
    """PostgREST's HTTP status for a PostgreSQL error code."""
    if sqlstate == "42501":
        return 401 if role == ANON_ROLE else 403
    return _EXACT_STATUS.get(sqlstate) or _CLASS_STATUS.get(sqlstate[:2], 400)


class RpcError(Exception):
    """Raised inside a request to answer PostgREST's error body with `status`."""

    def __init__(
        self, status: int, code: str, message: str, details: str | None = None, hint: str | None = None
    ):
        super().__init__(message)
        self.status, self.body = status, {"code": code, "details": details, "hint": hint, "message": message}


@dataclass
class _Function:
    name: str
    args: dict[str, str]  # IN argument name -> its type, as the catalog spells it
    required: set[str]
    returns_set: bool
    returns_row: bool
    returns_void: bool
    read_only: bool


@dataclass
class Faults:
    """Faults the next matching requests get; each is used once per `times`."""

    _pending: list[dict[str, Any]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def drop_after_commit(self, fn: str | None = None, times: int = 1) -> None:
        self._add(kind="drop", fn=fn, times=times)

    def fail(self, status: int = 503, fn: str | None = None, times: int = 1) -> None:
        self._add(kind="fail", fn=fn, times=times, status=status)

    def delay(self, seconds: float, fn: str | None = None, times: int = 1) -> None:
        self._add(kind="delay", fn=fn, times=times, seconds=seconds)

    def _add(self, **fault: Any) -> None:
        with self._lock:
            self._pending.append(fault)

    def take(self, fn: str) -> dict[str, Any] | None:
        with self._lock:
            for fault in self._pending:
                if fault["fn"] in (None, fn):
                    fault["times"] -= 1
                    if fault["times"] <= 0:
                        self._pending.remove(fault)
                    return fault
        return None


class PostgrestEndpoint:
    """The running endpoint: `url` is the Supabase project URL to give the transport."""

    def __init__(self, database_url: str, *, pool_size: int = 8) -> None:
        self.jwt_secret = secrets.token_hex(32)
        self.service_role_key = self.token("service_role")
        self.anon_key = self.token(ANON_ROLE)
        self.faults = Faults()
        self.calls: collections.Counter[str] = collections.Counter()  # requests per function
        self._calls_lock = threading.Lock()
        self.pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            psycopg.conninfo.make_conninfo(database_url, user="authenticator"),
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},  # each request opens its own transaction below
            open=True,
        )
        self.role_settings = self._load_role_settings()
        self._functions: dict[str, list[_Function]] = {}
        self._queries: dict[tuple[str, tuple[str, ...]], bytes] = {}
        self._verified: dict[str, dict[str, Any]] = {}
        self._sockets: set[socket.socket] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(
            target=self.server.serve_forever, args=(0.05,), name="postgrest", daemon=True
        )
        self._thread.start()

    def token(self, role: str, **claims: Any) -> str:
        now = int(time.time())
        payload = {"iss": "supabase", "role": role, "iat": now, "exp": now + 3600} | claims
        return jwt.encode(payload, self.jwt_secret, algorithm="HS256")

    def reload_schema(self) -> None:
        """What `notify pgrst, 'reload schema'` does: forget the cached function signatures."""
        self._functions.clear()
        self._queries.clear()

    def close(self) -> None:
        self.server.shutdown()
        for sock in list(self._sockets):  # idle keep-alive connections would hold their threads
            _suppress_oserror(sock.shutdown, socket.SHUT_RDWR)
        self.server.server_close()
        self._thread.join(timeout=5)
        self.pool.close()

    def _load_role_settings(self) -> dict[str, list[tuple[str, str]]]:
        query = """select r.rolname, s.setconfig from pg_catalog.pg_db_role_setting s
                     join pg_catalog.pg_roles r on r.oid = s.setrole
                    where s.setdatabase in (0, (select oid from pg_catalog.pg_database
                                                 where datname = current_database()))
                    order by s.setdatabase"""
        settings: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
        with self.pool.connection() as conn:
            for role, config in conn.execute(query):
                settings[role].extend(tuple(item.split("=", 1)) for item in config)
        return settings

    def count_call(self, name: str) -> None:
        with self._calls_lock:
            self.calls[name] += 1

    def _signatures(self, conn: psycopg.Connection[Any], name: str) -> list[_Function]:
        found = self._functions.get(name)
        if found is None:
            found = []
            for row in conn.execute(_FUNCTIONS_SQL, (name,)):
                _, retset, volatile, ndefaults, modes, names, void, row_type, in_types = row
                modes = modes or ["i"] * len(names)
                in_names = [n for n, m in zip(names, modes, strict=False) if m in "ibv"]
                required = set(in_names[: len(in_names) - ndefaults])
                args = dict(zip(in_names, in_types, strict=True))
                found.append(_Function(name, args, required, retset, row_type, void, volatile in "si"))
            self._functions[name] = found
        return found

    def _lookup(self, conn: psycopg.Connection[Any], name: str, keys: set[str]) -> _Function:
        matches = [f for f in self._signatures(conn, name) if keys <= f.args.keys() and f.required <= keys]
        if not matches:
            self._functions.pop(name, None)  # PostgREST would need a reload; a miss is not cached here
            signature = f"public.{name}({', '.join(sorted(keys))})"
            hint = "Try reloading the schema cache."
            raise RpcError(
                404, "PGRST202", f"Could not find the function {signature} in the schema cache", hint=hint
            )
        if len(matches) > 1:
            raise RpcError(300, "PGRST203", f"Could not choose the best candidate function for public.{name}")
        return matches[0]

    def call(self, name: str, body: dict[str, Any], role: str, claims: dict[str, Any]) -> tuple[bool, Any]:
        """Run one RPC in one transaction; returns (has_body, value)."""
        with self.pool.connection() as conn:
            fn = self._lookup(conn, name, set(body))
            gucs = [
                ("role", role),
                ("request.jwt.claims", json.dumps(claims)),
                *self.role_settings.get(role, []),
            ]
            query = self._queries.get((name, tuple(body)))
            if query is None:
                query = self._queries[name, tuple(body)] = _call_sql(fn, list(body)).as_bytes(conn)
            # Pipelined, as PostgREST pipelines its statements: begin, settings, call, commit.
            with conn.pipeline(), conn.transaction():
                if fn.read_only:
                    conn.execute("set transaction read only")
                conn.execute(
                    "select set_config(k, v, true) from unnest(%s::text[], %s::text[]) as s(k, v)",
                    ([k for k, _ in gucs], [v for _, v in gucs]),
                )
                value = conn.execute(query, (json.dumps(body),)).fetchone()
        return (not fn.returns_void, value[0] if value else None)

    def insert(
        self,
        table: str,
        body: Any,
        role: str,
        claims: dict[str, Any],
        prefer: set[str],
        on_conflict: str | None,
    ) -> tuple[bool, Any]:
        """Insert (or upsert) rows into a table in one transaction; returns (has_body, rows)."""
        rows = body if isinstance(body, list) else [body]
        if not rows or not all(isinstance(row, dict) for row in rows):
            raise RpcError(400, "PGRST102", "An invalid request body was sent: expected JSON objects")
        posted = list(dict.fromkeys(key for row in rows for key in row))
        with self.pool.connection() as conn:
            columns = {name: (kind, key) for name, kind, key in conn.execute(_COLUMNS_SQL, (table,))}
            if not columns:
                raise RpcError(404, "42P01", f'relation "public.{table}" does not exist')
            unknown = [name for name in posted if name not in columns]
            if unknown:
                message = f"Could not find the '{unknown[0]}' column of '{table}' in the schema cache"
                raise RpcError(400, "PGRST204", message)
            query = _insert_sql(table, posted, columns, prefer, on_conflict)
            gucs = [
                ("role", role),
                ("request.jwt.claims", json.dumps(claims)),
                *self.role_settings.get(role, []),
            ]
            with conn.transaction():
                conn.execute(
                    "select set_config(k, v, true) from unnest(%s::text[], %s::text[]) as s(k, v)",
                    ([k for k, _ in gucs], [v for _, v in gucs]),
                )
                value = conn.execute(query, (json.dumps(rows),)).fetchone()
        return ("return=representation" in prefer, value[0] if value else [])

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a token signed with the endpoint's secret; raises jwt.PyJWTError otherwise."""
        claims = self._verified.get(token)
        if claims is None or claims.get("exp", 0) <= time.time():
            claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"])
            self._verified[token] = claims
        return claims


def _call_sql(fn: _Function, used: list[str]) -> sql.Composed:
    # Arguments are decoded by json_to_record, as PostgREST does; the types are the catalog's own spelling.
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(a), sql.SQL(fn.args[a])) for a in used
    )
    args_cte: sql.Composable = sql.SQL("select * from json_to_record(%s::json) as _({})").format(columns)
    if not used:
        args_cte = sql.SQL("select where %s::json is not null")
    named = sql.SQL(", ").join(sql.SQL("{0} := _pgrst_args.{0}").format(sql.Identifier(a)) for a in used)
    call = sql.SQL("public.{}({})").format(sql.Identifier(fn.name), named)
    if fn.returns_set:
        shape = "coalesce(json_agg(_pgrst_t), '[]') from _pgrst_args, lateral {} as _pgrst_t"
        if not fn.returns_row:
            shape = "coalesce(json_agg(_pgrst_t.v), '[]') from _pgrst_args, lateral {} as _pgrst_t(v)"
    elif fn.returns_row:
        shape = "to_json(_pgrst_t) from _pgrst_args, lateral {} as _pgrst_t"
    else:
        shape = "to_json({}) from _pgrst_args"
    return sql.SQL("with _pgrst_args as ({}) select " + shape).format(args_cte, call)


def _insert_sql(
    table: str,
    posted: list[str],
    columns: dict[str, tuple[str, bool]],
    prefer: set[str],
    on_conflict: str | None,
) -> sql.Composed:
    qualified = sql.SQL("public.{}").format(sql.Identifier(table))
    names = sql.SQL(", ").join(sql.Identifier(c) for c in posted)
    typed = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(columns[c][0])) for c in posted
    )
    body = sql.SQL(", ").join(sql.SQL("pgrst_body.{}").format(sql.Identifier(c)) for c in posted)
    conflict: sql.Composable = sql.SQL("")
    resolution = next((p.split("=", 1)[1] for p in prefer if p.startswith("resolution=")), None)
    if resolution in ("merge-duplicates", "ignore-duplicates"):
        targets = on_conflict.split(",") if on_conflict else [c for c, (_, key) in columns.items() if key]
        action: sql.Composable = sql.SQL("DO NOTHING")
        if resolution == "merge-duplicates":
            action = sql.SQL("DO UPDATE SET {}").format(
                sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in posted)
            )
        conflict = sql.SQL(" ON CONFLICT({}) {}").format(
            sql.SQL(", ").join(sql.Identifier(c.strip()) for c in targets), action
        )
    return sql.SQL(
        "WITH pgrst_source AS (INSERT INTO {table}({names}) SELECT {body}"
        " FROM (SELECT %s::json AS json_data) pgrst_payload,"
        " LATERAL (SELECT {names} FROM json_to_recordset(pgrst_payload.json_data) AS _({typed})) pgrst_body"
        "{conflict} RETURNING {table}.*)"
        " SELECT coalesce(json_agg(_postgrest_t), '[]') FROM (SELECT * FROM pgrst_source) _postgrest_t"
    ).format(table=qualified, names=names, body=body, typed=typed, conflict=conflict)


def _suppress_oserror(action: Any, *args: Any) -> None:
    with contextlib.suppress(OSError):
        action(*args)


def _handler_for(endpoint: PostgrestEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as behind Supabase's gateway
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls

        def setup(self) -> None:
            super().setup()
            endpoint._sockets.add(self.connection)

        def finish(self) -> None:
            endpoint._sockets.discard(self.connection)
            _suppress_oserror(super().finish)

        def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures
            pass

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if not self.path.startswith(TABLE_PREFIX):
                return self._reply(404, {"message": "no Route matched with those values"})
            if not self.path.startswith(RPC_PREFIX):
                return self._insert(raw)
            name = self.path.removeprefix(RPC_PREFIX).split("?", 1)[0]
            endpoint.count_call(name)
            fault = endpoint.faults.take(name)
            if fault and fault["kind"] == "fail":
                message = "Database client error. Retrying the connection."
                return self._reply(fault["status"], RpcError(fault["status"], "PGRST001", message).body)
            try:
                role, claims = self._authenticate()
                has_body, value = endpoint.call(name, _named_arguments(raw), role, claims)
            except RpcError as exc:
                return self._reply(exc.status, exc.body)
            except psycopg.Error as exc:
                code = exc.diag.sqlstate or "XX000"
                error = RpcError(
                    status_for(code, role),
                    code,
                    exc.diag.message_primary or str(exc),
                    exc.diag.message_detail,
                    exc.diag.message_hint,
                )
                return self._reply(error.status, error.body)
            if fault and fault["kind"] == "drop":
                self.close_connection = True  # committed; the reply is lost on the way
                return _suppress_oserror(self.connection.shutdown, socket.SHUT_RDWR)
            if fault and fault["kind"] == "delay":
                time.sleep(fault["seconds"])
            self._reply(200 if has_body else 204, value if has_body else None, has_body)

        def _insert(self, raw: bytes) -> None:
            target = urllib.parse.urlsplit(self.path)
            table = target.path.removeprefix(TABLE_PREFIX)
            on_conflict = urllib.parse.parse_qs(target.query).get("on_conflict", [None])[0]
            prefer = {p.strip() for p in self.headers.get("Prefer", "").split(",") if p.strip()}
            role = ANON_ROLE
            try:
                role, claims = self._authenticate()
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    raise RpcError(400, "PGRST102", "An invalid request body was sent") from None
                has_body, rows = endpoint.insert(table, body, role, claims, prefer, on_conflict)
            except RpcError as exc:
                return self._reply(exc.status, exc.body)
            except psycopg.Error as exc:
                code = exc.diag.sqlstate or "XX000"
                error = RpcError(
                    status_for(code, role),
                    code,
                    exc.diag.message_primary or str(exc),
                    exc.diag.message_detail,
                    exc.diag.message_hint,
                )
                return self._reply(error.status, error.body)
            self._reply(201, rows if has_body else None, has_body)

        def _authenticate(self) -> tuple[str, dict[str, Any]]:
            apikey = self.headers.get("apikey")
            if not apikey:
                raise RpcError(401, "", "No API key found in request")
            try:
                endpoint.verify(apikey)
            except jwt.PyJWTError:
                raise RpcError(401, "", "Invalid API key") from None
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Bearer "):
                return ANON_ROLE, {"role": ANON_ROLE}
            try:
                claims = endpoint.verify(auth.removeprefix("Bearer "))
            except jwt.PyJWTError as exc:
                raise RpcError(401, "PGRST301", f"JWT is invalid: {exc}") from None
            return str(claims.get("role", ANON_ROLE)), claims

        def _reply(self, status: int, value: Any, has_body: bool = True) -> None:
            data = json.dumps(value).encode() if has_body else b""
            self.send_response(status)
            if has_body:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def _named_arguments(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise RpcError(400, "PGRST102", "An invalid request body was sent: expected a JSON object")
    return body


@contextmanager
def running_postgrest(database_url: str) -> Iterator[PostgrestEndpoint]:
    """A PostgREST-compatible endpoint over `database_url`'s database, closed on exit."""
    endpoint = PostgrestEndpoint(database_url)
    try:
        yield endpoint
    finally:
        endpoint.close()
