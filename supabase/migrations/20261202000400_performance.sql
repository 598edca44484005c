-- Performance at the ceiling (issue 9): a cheaper enqueue and doorbell, a doorbell that needs no shared clock,
-- and autovacuum settings that keep the queue table flat under a month of history.
-- Only enqueue-side SQL and storage parameters: the claim and settle functions are untouched.
-- Re-running this file is harmless.

-- -- The doorbell ----------------------------------------------------------------------------------------------
-- One definition of a ring, now in PL/pgSQL: the SQL-language version (with its `set search_path`) could not be
-- inlined, so PostgreSQL planned its two statements again on every call, and the Realtime lookup parsed a
-- signature each time. Together they were ~40 % of a one-job enqueue.
--
-- The payload gains `delay_ms`: how long until the earliest job is due, by the database's own clock. A worker
-- adds it to its own clock, so a worker host whose clock differs from the database's neither waits for a job
-- that is due now nor claims one early; `run_at` stays for workers of the previous version.
create or replace function public.coding_jobs_ring(p_queue text, p_run_at timestamptz) returns void
language plpgsql volatile set search_path = ''
as $$
begin
  perform pg_catalog.pg_notify(
    'coding_jobs',
    pg_catalog.json_build_object(
      'queue', p_queue,
      'run_at', ceil(extract(epoch from p_run_at) * 1000)::bigint,
      'delay_ms', greatest(ceil(extract(epoch from p_run_at - pg_catalog.clock_timestamp()) * 1000), 0)::bigint
    )::text
  );
  -- Realtime lives in the `realtime` schema on Supabase only: a catalog cache lookup, not a query.
  if pg_catalog.to_regnamespace('realtime') is not null then
    perform public.coding_jobs_broadcast(p_queue, p_run_at);
  end if;
end
$$;

-- -- The payload fill ------------------------------------------------------------------------------------------
-- The fill trigger only changes rows whose kwargs are missing or hold a domain value (prompt, session, project,
-- user): its WHEN clause lets every other row (most Python producers' messages) skip the PL/pgSQL call. The
-- UUID check is inline: the SQL-language helper could not be inlined either (its `set search_path`).
create or replace function public.coding_jobs_fill_payload() returns trigger
language plpgsql set search_path = ''
as $$
declare
  uuid_pattern constant text := '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';
begin
  if new.kwargs is null then
    new.kwargs := pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object(
      'session_id', new.session_id,
      'project_id', new.project_id,
      'user_id', new.user_id
    ));
  elsif pg_catalog.jsonb_typeof(new.kwargs) = 'object' then
    if pg_catalog.jsonb_typeof(new.kwargs -> 'prompt') = 'string' then
      new.prompt := coalesce(new.prompt, new.kwargs ->> 'prompt');
      new.kwargs := new.kwargs - 'prompt';
    end if;
    if new.session_id is null and (new.kwargs ->> 'session_id') ~* uuid_pattern then
      new.session_id := (new.kwargs ->> 'session_id')::uuid;
    end if;
    if new.project_id is null and (new.kwargs ->> 'project_id') ~* uuid_pattern then
      new.project_id := (new.kwargs ->> 'project_id')::uuid;
    end if;
    if new.user_id is null and (new.kwargs ->> 'user_id') ~* uuid_pattern then
      new.user_id := (new.kwargs ->> 'user_id')::uuid;
    end if;
  end if;
  return new;
end
$$;

drop trigger if exists coding_jobs_fill_payload on public.coding_jobs;
create trigger coding_jobs_fill_payload
  before insert on public.coding_jobs
  for each row
  when (new.kwargs is null or new.kwargs ?| array['prompt', 'session_id', 'project_id', 'user_id'])
  execute function public.coding_jobs_fill_payload();

-- The Realtime doorbell carries the same `delay_ms`.
create or replace function public.coding_jobs_broadcast(p_queue text, p_run_at timestamptz) returns void
language plpgsql volatile security definer set search_path = ''
as $$
begin
  if to_regprocedure('realtime.send(jsonb, text, text, boolean)') is null then
    return;
  end if;
  execute 'select realtime.send($1, $2, $3, $4)'
    using pg_catalog.jsonb_build_object(
            'queue', p_queue,
            'run_at', ceil(extract(epoch from p_run_at) * 1000)::bigint,
            'delay_ms',
            greatest(ceil(extract(epoch from p_run_at - pg_catalog.clock_timestamp()) * 1000), 0)::bigint
          ),
          'ring', 'coding_jobs', true;
end
$$;

-- -- One job per call ------------------------------------------------------------------------------------------
-- enqueue_job: enqueue_jobs for a single message, with typed parameters instead of a JSON array to unpack: what
-- a producer's send() calls (a fifth less database time than enqueue_jobs with one element). A message id seen
-- before is ignored; returns 1 when the row was inserted, 0 when it was there already.
create or replace function public.enqueue_job(
  p_id uuid, p_queue text, p_actor text, p_args jsonb, p_kwargs jsonb, p_options jsonb, p_priority integer,
  p_max_retries integer, p_delay_ms bigint
) returns integer
language plpgsql volatile set search_path = ''
as $$
begin
  insert into public.coding_jobs (id, queue_name, actor_name, args, kwargs, options, priority, max_retries, run_at)
  values (p_id, p_queue, p_actor, coalesce(p_args, '[]'::jsonb), coalesce(p_kwargs, '{}'::jsonb),
          coalesce(p_options, '{}'::jsonb), coalesce(p_priority, 0), coalesce(p_max_retries, 3),
          now() + coalesce(p_delay_ms, 0) * interval '1 millisecond')
  on conflict (id) do nothing;
  return case when found then 1 else 0 end;
end
$$;

revoke all on function
  public.enqueue_job(uuid, text, text, jsonb, jsonb, jsonb, integer, integer, bigint)
from public, anon, authenticated;
grant execute on function
  public.enqueue_job(uuid, text, text, jsonb, jsonb, jsonb, integer, integer, bigint)
to service_role;


-- -- Autovacuum for a queue table ----------------------------------------------------------------------------
-- Every job leaves two dead row versions (claimed, completed) while the table keeps months of history. With
-- PostgreSQL's defaults a vacuum waits for dead tuples worth 20 % of the table: 200,000 of them at a million
-- rows, more as history grows. Thresholds in rows, not in shares of the table, keep vacuums as frequent at a
-- million rows as at a thousand (bench/table_health.py measures both).
alter table public.coding_jobs set (
  autovacuum_vacuum_scale_factor = 0,
  autovacuum_vacuum_threshold = 10000,
  autovacuum_vacuum_insert_scale_factor = 0,
  autovacuum_vacuum_insert_threshold = 20000,
  autovacuum_analyze_scale_factor = 0,
  autovacuum_analyze_threshold = 20000,
  autovacuum_vacuum_cost_delay = 1
);

notify pgrst, 'reload schema';
