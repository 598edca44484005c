-- Dramatiq's result backend and rate-limiter backend on the queue's own PostgreSQL, for the Python
-- backends in broker/results.py: actor results (message.get_result, group.wait) and counters (rate limiters,
-- and the barriers behind group completion callbacks). Python speaks only through the functions below.
-- Re-running this file is harmless.
--
-- Logged tables, not UNLOGGED, although Redis-like state is what UNLOGGED is for: an unlogged table is
-- emptied by crash recovery, is empty on a promoted replica after a Supabase failover, cannot be read on read
-- replicas, and is missing from physical (PITR) backups. A lost barrier is not harmless: a group member that
-- finds its barrier gone clears it, so the completion callback would run early and once per remaining member.
-- The rows are few and small (one per result, one per limiter key), so the WAL they cost is worth it.
--
-- Functions that take arguments are strict: a call with a null argument does nothing and returns null.

create table if not exists public.queue_results (
  key text primary key,  -- Dramatiq's message key (an md5 of namespace, queue, actor and message id)
  value jsonb not null,  -- the encoded result, or Dramatiq's exception wrapper
  expires_at timestamptz not null
);

create table if not exists public.queue_counters (
  key text primary key,  -- a rate limiter's key, a window's key@second, a group's barrier uuid
  value bigint not null,
  expires_at timestamptz not null
);

comment on table public.queue_results is
  'Dramatiq actor results. Expired rows count as absent; queue_purge_expired_results() deletes them.';
comment on table public.queue_counters is
  'Dramatiq rate-limiter and barrier counters. Expired rows count as absent (value 0).';

create index if not exists queue_results_expires_idx on public.queue_results (expires_at);
create index if not exists queue_counters_expires_idx on public.queue_counters (expires_at);

-- store_result: set a result, replacing any earlier one, for p_ttl_ms.
create or replace function public.queue_store_result(p_key text, p_value jsonb, p_ttl_ms bigint) returns void
language sql volatile strict set search_path = ''
as $$
  insert into public.queue_results as r (key, value, expires_at)
  values (p_key, p_value, now() + p_ttl_ms * interval '1 millisecond')
  on conflict (key) do update set value = excluded.value, expires_at = excluded.expires_at
$$;

-- get_result: the result, or null when there is none or it expired.
create or replace function public.queue_get_result(p_key text) returns jsonb
language sql stable strict set search_path = ''
as $$
  select r.value from public.queue_results r where r.key = p_key and r.expires_at > now()
$$;

-- purge_expired_results: delete expired results and counters; returns how many rows went.
-- The Python backend calls it now and then; pg_cron can call it too.
create or replace function public.queue_purge_expired_results() returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  results integer;
  counters integer;
begin
  delete from public.queue_results where expires_at <= now();
  get diagnostics results = row_count;
  delete from public.queue_counters where expires_at <= now();
  get diagnostics counters = row_count;
  return results + counters;
end
$$;

-- queue_counters_lock: serialize the writers of these keys until the transaction ends.
-- Advisory locks, not row locks, because a key may have no row yet: a window's sum must also wait for a
-- caller that is about to create one. Taken in the order of the lock ids (two keys may share an id), so
-- callers over overlapping windows never deadlock. The first argument keeps these ids apart from other users of
-- advisory locks (such as the migration lock's single bigint).
create or replace function public.queue_counters_lock(p_keys text[]) returns void
language plpgsql volatile strict set search_path = ''
as $$
declare
  lock_id integer;
begin
  for lock_id in select distinct pg_catalog.hashtext(k) from unnest(p_keys) as k order by 1 loop
    perform pg_catalog.pg_advisory_xact_lock(1363366988, lock_id);  -- 'QCTL' as an integer
  end loop;
end
$$;

-- queue_counters_value: the counter's value, or null when it is absent or expired.
create or replace function public.queue_counters_value(p_key text) returns bigint
language sql stable strict set search_path = ''
as $$
  select c.value from public.queue_counters c where c.key = p_key and c.expires_at > now()
$$;

create or replace function public.queue_counters_set(p_key text, p_value bigint, p_ttl_ms bigint) returns void
language sql volatile strict set search_path = ''
as $$
  insert into public.queue_counters as c (key, value, expires_at)
  values (p_key, p_value, now() + p_ttl_ms * interval '1 millisecond')
  on conflict (key) do update set value = excluded.value, expires_at = excluded.expires_at
$$;

-- counter_add: create the counter with p_value unless it exists and has not expired (Redis SET NX PX).
create or replace function public.queue_counter_add(p_key text, p_value bigint, p_ttl_ms bigint) returns boolean
language plpgsql volatile strict set search_path = ''
as $$
begin
  perform public.queue_counters_lock(array[p_key]);
  if public.queue_counters_value(p_key) is not null then
    return false;
  end if;
  perform public.queue_counters_set(p_key, p_value, p_ttl_ms);
  return true;
end
$$;

-- queue_counters_change: add p_delta (an absent counter counts as 0) unless the new value leaves
-- [p_minimum, p_maximum]; a change resets the TTL.
create or replace function public.queue_counters_change(
  p_key text, p_delta bigint, p_minimum bigint, p_maximum bigint, p_ttl_ms bigint
) returns boolean
language plpgsql volatile strict set search_path = ''
as $$
declare
  new_value bigint;
begin
  perform public.queue_counters_lock(array[p_key]);
  new_value := coalesce(public.queue_counters_value(p_key), 0) + p_delta;
  if new_value < p_minimum or new_value > p_maximum then
    return false;
  end if;
  perform public.queue_counters_set(p_key, new_value, p_ttl_ms);
  return true;
end
$$;

-- counter_incr: add p_amount unless the value would exceed p_maximum.
create or replace function public.queue_counter_incr(p_key text, p_amount bigint, p_maximum bigint, p_ttl_ms bigint)
returns boolean
language sql volatile strict set search_path = ''
as $$
  select public.queue_counters_change(p_key, p_amount, -9223372036854775808, p_maximum, p_ttl_ms)
$$;

-- counter_decr: subtract p_amount unless the value would fall below p_minimum.
create or replace function public.queue_counter_decr(p_key text, p_amount bigint, p_minimum bigint, p_ttl_ms bigint)
returns boolean
language sql volatile strict set search_path = ''
as $$
  select public.queue_counters_change(p_key, -p_amount, p_minimum, 9223372036854775807, p_ttl_ms)
$$;

-- counter_incr_and_sum: add p_amount to p_key unless its value, or the sum over p_keys (a sliding window's
-- keys, p_key among them), would then exceed p_maximum.
create or replace function public.queue_counter_incr_and_sum(
  p_key text, p_keys text[], p_amount bigint, p_maximum bigint, p_ttl_ms bigint
) returns boolean
language plpgsql volatile strict set search_path = ''
as $$
declare
  current_value bigint;
  window_sum bigint;
begin
  perform public.queue_counters_lock(array_append(p_keys, p_key));
  current_value := coalesce(public.queue_counters_value(p_key), 0);
  select coalesce(sum(c.value), 0) into window_sum
    from public.queue_counters c
   where c.key = any(p_keys) and c.expires_at > now();
  if current_value + p_amount > p_maximum or window_sum + p_amount > p_maximum then
    return false;
  end if;
  perform public.queue_counters_set(p_key, current_value + p_amount, p_ttl_ms);
  return true;
end
$$;

-- counter_get: the counter's value, or null when it is absent or expired (blocking barrier waits poll it).
create or replace function public.queue_counter_get(p_key text) returns bigint
language sql stable strict set search_path = ''
as $$
  select public.queue_counters_value(p_key)
$$;

-- Grants: only service_role (and the owner) may use these. RLS is on with no policies, so nothing reaches
-- the rows through the API even if a grant slips in; service_role bypasses RLS.
alter table public.queue_results enable row level security;
alter table public.queue_counters enable row level security;

revoke all on table public.queue_results, public.queue_counters from public, anon, authenticated;
grant select, insert, update, delete on table public.queue_results, public.queue_counters to service_role;

revoke all on function
  public.queue_store_result(text, jsonb, bigint),
  public.queue_get_result(text),
  public.queue_purge_expired_results(),
  public.queue_counters_lock(text[]),
  public.queue_counters_value(text),
  public.queue_counters_set(text, bigint, bigint),
  public.queue_counter_add(text, bigint, bigint),
  public.queue_counters_change(text, bigint, bigint, bigint, bigint),
  public.queue_counter_incr(text, bigint, bigint, bigint),
  public.queue_counter_decr(text, bigint, bigint, bigint),
  public.queue_counter_incr_and_sum(text, text[], bigint, bigint, bigint),
  public.queue_counter_get(text)
from public, anon, authenticated;

grant execute on function
  public.queue_store_result(text, jsonb, bigint),
  public.queue_get_result(text),
  public.queue_purge_expired_results(),
  public.queue_counters_lock(text[]),
  public.queue_counters_value(text),
  public.queue_counters_set(text, bigint, bigint),
  public.queue_counter_add(text, bigint, bigint),
  public.queue_counters_change(text, bigint, bigint, bigint, bigint),
  public.queue_counter_incr(text, bigint, bigint, bigint),
  public.queue_counter_decr(text, bigint, bigint, bigint),
  public.queue_counter_incr_and_sum(text, text[], bigint, bigint, bigint),
  public.queue_counter_get(text)
to service_role;
