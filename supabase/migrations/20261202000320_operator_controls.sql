-- The operator's controls: pause and resume (claim_jobs reads a small table), cancellation for the service and
-- for the web app's signed-in user, the heartbeat that tells a worker which of its jobs were asked to stop, and
-- retention. Builds on 20261202000310_operator_bookkeeping.sql. Re-running this file is harmless.

-- -- Pause and resume ------------------------------------------------------------------------------------------
create table if not exists public.queue_pauses (
  queue_name text primary key,
  paused_at timestamptz not null default now(),
  reason text
);

comment on table public.queue_pauses is 'Queues no worker claims from until resume_queue().';

-- pause_queue: claims skip the queue from now on; jobs already running finish. Pausing again keeps the
-- first pause's time and takes the new reason.
create or replace function public.pause_queue(p_queue text, p_reason text default null)
returns table (queue_name text, paused_at timestamptz, reason text)
language sql volatile set search_path = ''
as $$
  insert into public.queue_pauses as p (queue_name, reason) values (p_queue, p_reason)
  on conflict on constraint queue_pauses_pkey do update set reason = coalesce(excluded.reason, p.reason)
  returning p.queue_name, p.paused_at, p.reason
$$;

-- resume_queue: claims take the queue again; the doorbell wakes its idle workers at once.
create or replace function public.resume_queue(p_queue text) returns table (queue_name text, resumed boolean)
language plpgsql volatile set search_path = ''
as $$
begin
  delete from public.queue_pauses p where p.queue_name = p_queue;
  resumed := found;
  queue_name := p_queue;
  if resumed then
    perform public.coding_jobs_ring(p_queue, now());
  end if;
  return next;
end
$$;

create or replace function public.get_paused_queues()
returns table (queue_name text, paused_at timestamptz, reason text)
language sql stable set search_path = ''
as $$
  select p.queue_name, p.paused_at, p.reason from public.queue_pauses p order by p.queue_name
$$;

-- Claims skip paused queues: the same claim_jobs as the lifecycle's, with the pause checked first (a claim
-- repeated after a lost reply still answers what it claimed).
create or replace function public.claim_jobs(
  p_worker_id text, p_queue text, p_limit integer, p_lease_ms integer, p_claim_token uuid
) returns setof public.coding_jobs
language plpgsql volatile set search_path = ''
as $$
begin
  return query
  select * from public.coding_jobs j
   where j.claim_token = p_claim_token and j.status = 'processing' and j.locked_by = p_worker_id
   order by j.priority desc, j.created_at;
  if found then
    return;
  end if;
  if exists (select from public.queue_pauses p where p.queue_name = p_queue)
     or not exists (
       select from public.queue_workers w where w.worker_id = p_worker_id and w.lost_at is null) then
    return;
  end if;
  return query
  with next_jobs as (
    select j.id
      from public.coding_jobs j
     where j.status = 'pending' and j.queue_name = p_queue and j.run_at <= now()
     order by j.priority desc, j.created_at
     limit p_limit
       for update skip locked
  ), claimed as (
    update public.coding_jobs j
       set status = 'processing',
           locked_by = p_worker_id,
           claim_token = p_claim_token,
           lease_expires_at = now() + p_lease_ms * interval '1 millisecond',
           started_at = now()
      from next_jobs n
     where j.id = n.id
    returning j.*
  )
  select * from claimed c order by c.priority desc, c.created_at;
end
$$;

create or replace function public.claim_jobs(
  p_worker_id text, p_queue text, p_limit integer, p_lease_ms integer default 60000
) returns setof public.coding_jobs
language plpgsql volatile set search_path = ''
as $$
begin
  if exists (select from public.queue_pauses p where p.queue_name = p_queue) then
    return;
  end if;
  return query
  with next_jobs as (
    select j.id
      from public.coding_jobs j
     where j.status = 'pending' and j.queue_name = p_queue and j.run_at <= now()
     order by j.priority desc, j.created_at
     limit p_limit
       for update skip locked
  ), claimed as (
    update public.coding_jobs j
       set status = 'processing',
           locked_by = p_worker_id,
           claim_token = gen_random_uuid(),
           lease_expires_at = now() + p_lease_ms * interval '1 millisecond',
           started_at = now()
      from next_jobs n
     where j.id = n.id
    returning j.*
  )
  select (jsonb_populate_record(null::public.coding_jobs, to_jsonb(c) || jsonb_build_object('kwargs', case
            when c.prompt is not null and jsonb_typeof(c.kwargs) = 'object' and not (c.kwargs ? 'prompt')
            then c.kwargs || jsonb_build_object('prompt', c.prompt) else c.kwargs end))).*
    from claimed c order by c.priority desc, c.created_at;
end
$$;

create or replace function public.claim_next_job() returns setof public.coding_jobs
language plpgsql volatile set search_path = ''
as $$
begin
  return query
  with next_job as (
    select j.id
      from public.coding_jobs j
     where j.status = 'pending' and j.run_at <= now()
       and not exists (select from public.queue_pauses p where p.queue_name = j.queue_name)
     order by j.priority desc, j.created_at
     limit 1
       for update skip locked
  )
  update public.coding_jobs j
     set status = 'processing',
         locked_by = 'claim_next_job',
         claim_token = gen_random_uuid(),
         lease_expires_at = now() + interval '60 seconds',
         started_at = now()
    from next_job n
   where j.id = n.id
  returning j.*;
end
$$;

-- -- Cancellation ----------------------------------------------------------------------------------------------
-- The cancel doorbell: {"cancel": <job id>} on the queue's channel (and a Realtime Broadcast `cancel` event
-- {"job": <job id>}), so the worker holding the job stops it at once. Security definer like
-- coding_jobs_broadcast, for realtime.send.
create or replace function public.coding_jobs_ring_cancel(p_job_id uuid) returns void
language plpgsql volatile security definer set search_path = ''
as $$
begin
  perform pg_catalog.pg_notify('coding_jobs', json_build_object('cancel', p_job_id)::text);
  if to_regprocedure('realtime.send(jsonb, text, text, boolean)') is not null then
    execute 'select realtime.send($1, $2, $3, $4)'
      using jsonb_build_object('job', p_job_id), 'cancel', 'coding_jobs', true;
  end if;
end
$$;

-- coding_jobs_cancel: the one cancellation, for the service (p_user_id null: any job) and for a user (only
-- their own jobs). A pending job ends `cancelled` and never runs; a running one is asked to stop (its worker
-- hears the doorbell, or its next heartbeat) and ends `cancelled` when it does. Outcome per id: 'cancelled',
-- 'cancelling', the status of a job that had already finished, or 'not_found' (which is also what a user
-- hears about someone else's job).
create or replace function public.coding_jobs_cancel(p_job_ids uuid[], p_note text, p_user_id uuid)
returns table (id uuid, outcome text)
language plpgsql volatile set search_path = ''
as $$
begin
  return query
  with wanted as (
    select distinct w.id from unnest(p_job_ids) as w(id) where w.id is not null
  ), target as (
    select j.id, j.status
      from public.coding_jobs j join wanted w on w.id = j.id
     where p_user_id is null or j.user_id = p_user_id
       for update of j
  ), dropped as (
    update public.coding_jobs j
       set status = 'cancelled', completed_at = now(), error_message = p_note, cancel_requested_at = now()
      from target t
     where j.id = t.id and t.status = 'pending'
    returning j.id
  ), asked as (
    update public.coding_jobs j
       set cancel_requested_at = coalesce(j.cancel_requested_at, now()),
           error_message = coalesce(p_note, j.error_message)
      from target t
     where j.id = t.id and t.status = 'processing'
    returning j.id
  ), rung as (
    select public.coding_jobs_ring_cancel(a.id) from asked a
  )
  select w.id,
         case when d.id is not null then 'cancelled'
              when a.id is not null then 'cancelling'
              when t.id is null then 'not_found'
              else t.status::text end
    from wanted w
    left join target t on t.id = w.id
    left join dropped d on d.id = w.id
    left join asked a on a.id = w.id
   cross join (select count(*) from rung) r
   order by w.id;
end
$$;

-- cancel_jobs: the service's cancellation (the CLI, the dashboard, Python producers).
create or replace function public.cancel_jobs(p_job_ids uuid[], p_reason text default null)
returns table (id uuid, outcome text)
language sql volatile set search_path = ''
as $$
  select c.id, c.outcome
    from public.coding_jobs_cancel(p_job_ids, 'cancelled by the service' || coalesce(': ' || p_reason, ''), null) c
$$;

-- cancel_my_job: the web app's cancellation, called through PostgREST with the signed-in user's JWT; it
-- cancels only that user's own job. Returns the outcome as cancel_jobs does.
create or replace function public.cancel_my_job(p_job_id uuid) returns text
language plpgsql volatile security definer set search_path = ''
as $$
declare
  v_user uuid := auth.uid();
  v_outcome text;
begin
  if v_user is null then
    raise exception 'cancel_my_job needs a signed-in user' using errcode = '42501';
  end if;
  select c.outcome into v_outcome
    from public.coding_jobs_cancel(array[p_job_id], 'cancelled by its user', v_user) c;
  return v_outcome;
end
$$;

-- cancel_held_jobs: a worker ends the held jobs it stopped because their cancellation was asked for.
-- Fenced by the claim; idempotent per claim like complete_jobs. Returns the ids now cancelled by these claims.
create or replace function public.cancel_held_jobs(p_job_ids uuid[], p_claim_tokens uuid[])
returns setof uuid
language plpgsql volatile set search_path = ''
as $$
begin
  return query
  with held as (
    select h.id, h.token from unnest(p_job_ids, p_claim_tokens) as h(id, token)
  ), done as (
    update public.coding_jobs j
       set status = 'cancelled', completed_at = now(), lease_expires_at = null
      from held h
     where j.id = h.id and j.claim_token = h.token and j.status = 'processing'
    returning j.id
  )
  select d.id from done d
  union all
  select j.id from public.coding_jobs j join held h on j.id = h.id and j.claim_token = h.token
   where j.status = 'cancelled';
end
$$;

-- -- The heartbeat also says which held jobs were asked to stop, and folds the statistics ----------------------
-- The same worker_heartbeat as the lifecycle's, plus `cancel_requested`: the held jobs whose cancellation was
-- asked for, so a worker that missed the doorbell (poll-only, REST without Realtime, a reconnect) stops them
-- at its next heartbeat. Workers of the previous version read the columns they know and ignore this one.
drop function if exists public.worker_heartbeat(text, uuid[], uuid[], integer, text[], integer, integer);
create function public.worker_heartbeat(
  p_worker_id text, p_job_ids uuid[], p_claim_tokens uuid[], p_lease_ms integer default null,
  p_queues text[] default null, p_max_rescues integer default 5, p_orphan_after_ms integer default 30000
) returns table (registered boolean, held uuid[], rescued integer, cancel_requested uuid[])
language plpgsql volatile set search_path = ''
as $$
declare
  v_registered boolean;
  v_held uuid[];
begin
  update public.queue_workers w
     set heartbeat_at = now(),
         queues = case when cardinality(p_queues) > 0 then p_queues else w.queues end
   where w.worker_id = p_worker_id;
  v_registered := found;

  with mine as (
    select h.id, h.token from unnest(p_job_ids, p_claim_tokens) as h(id, token)
  ), extended as (
    update public.coding_jobs j
       set lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
      from mine m
     where p_lease_ms is not null and j.id = m.id and j.claim_token = m.token and j.status = 'processing'
    returning j.id
  ), still as (
    select j.id from public.coding_jobs j join mine m on j.id = m.id and j.claim_token = m.token
     where p_lease_ms is null and j.status = 'processing'
  )
  select coalesce(array_agg(x.id), '{}') into v_held
    from (select id from extended union all select id from still) x;

  select coalesce(array_agg(j.id), '{}') into cancel_requested
    from public.coding_jobs j
   where j.id = any(v_held) and j.cancel_requested_at is not null;

  if v_registered then
    with orphans as (
      update public.coding_jobs j
         set status = 'pending', locked_by = null, claim_token = null, lease_expires_at = null, started_at = null
       where j.status = 'processing' and j.locked_by = p_worker_id and not (j.id = any(v_held))
         and j.started_at < now() - p_orphan_after_ms * interval '1 millisecond'
      returning j.queue_name, j.run_at
    )
    select count(*) into rescued
      from (select public.coding_jobs_ring(queue_name, min(run_at)) from orphans group by queue_name) r;
  end if;

  registered := v_registered;
  held := v_held;
  rescued := public.rescue_jobs(p_max_rescues);
  perform public.queue_compact_stats();
  return next;
end
$$;

-- -- Retention -------------------------------------------------------------------------------------------------
-- prune_jobs: delete completed and cancelled jobs that finished more than p_completed_ms ago, and failed ones
-- older than p_failed_ms (null keeps them), oldest first, in batches of p_batch rows, at most p_max_batches per
-- call; `more` says a full load went and more may be waiting. One pruner at a time: the others return at once.
-- It also folds the statistics' deltas (pg_cron can call it where no worker runs).
-- Claims never wait for it: it touches finished rows only, and skips any row someone else has locked.
create or replace function public.prune_jobs(
  p_completed_ms bigint default null, p_failed_ms bigint default null, p_batch integer default 500,
  p_max_batches integer default 20
) returns table (deleted bigint, more boolean)
language plpgsql volatile set search_path = ''
as $$
declare
  v_batch integer := least(greatest(p_batch, 1), 10000);
  v_batches integer := least(greatest(p_max_batches, 1), 1000);
  v_rows integer;
  v_deleted integer;
begin
  deleted := 0;
  more := false;
  if not pg_catalog.pg_try_advisory_xact_lock(1364675410, 2) then
    return next;
    return;
  end if;
  for batch in 1 .. v_batches loop
    v_rows := 0;
    -- Completed ones through the BRIN index on completed_at (any old ones: a bitmap scan stops at the limit).
    with doomed as (
      select j.id from public.coding_jobs j
       where p_completed_ms is not null and j.status = 'completed'
         and j.completed_at < now() - p_completed_ms * interval '1 millisecond'
       limit v_batch
         for update skip locked
    )
    delete from public.coding_jobs j using doomed d where j.id = d.id;
    get diagnostics v_deleted = row_count;
    v_rows := v_rows + v_deleted;
    -- Cancelled and failed ones, oldest first, through their own index.
    with doomed as (
      select j.id from public.coding_jobs j
       where p_completed_ms is not null and j.status = 'cancelled'
         and j.completed_at < now() - p_completed_ms * interval '1 millisecond'
       order by j.completed_at
       limit v_batch - v_rows
         for update skip locked
    )
    delete from public.coding_jobs j using doomed d where j.id = d.id;
    get diagnostics v_deleted = row_count;
    v_rows := v_rows + v_deleted;
    with doomed as (
      select j.id from public.coding_jobs j
       where p_failed_ms is not null and j.status = 'failed'
         and j.completed_at < now() - p_failed_ms * interval '1 millisecond'
       order by j.completed_at
       limit v_batch - v_rows
         for update skip locked
    )
    delete from public.coding_jobs j using doomed d where j.id = d.id;
    get diagnostics v_deleted = row_count;
    v_rows := v_rows + v_deleted;
    deleted := deleted + v_rows;
    more := v_rows = v_batch;
    exit when not more;
  end loop;
  delete from public.queue_stat_minutes m where m.minute < now() - interval '1 day';
  -- The heartbeats fold the counts' deltas; a queue with no worker running gets them folded here.
  perform public.queue_compact_stats();
  return next;
end
$$;

-- -- Grants ----------------------------------------------------------------------------------------------------
alter table public.queue_pauses enable row level security;
revoke all on table public.queue_pauses from public, anon, authenticated;
grant select, insert, update, delete on table public.queue_pauses to service_role;

revoke all on function
  public.pause_queue(text, text),
  public.resume_queue(text),
  public.get_paused_queues(),
  public.coding_jobs_ring_cancel(uuid),
  public.coding_jobs_cancel(uuid[], text, uuid),
  public.cancel_jobs(uuid[], text),
  public.cancel_my_job(uuid),
  public.cancel_held_jobs(uuid[], uuid[]),
  public.worker_heartbeat(text, uuid[], uuid[], integer, text[], integer, integer),
  public.prune_jobs(bigint, bigint, integer, integer)
from public, anon, authenticated;

grant execute on function
  public.pause_queue(text, text),
  public.resume_queue(text),
  public.get_paused_queues(),
  public.coding_jobs_ring_cancel(uuid),
  public.coding_jobs_cancel(uuid[], text, uuid),
  public.cancel_jobs(uuid[], text),
  public.cancel_held_jobs(uuid[], uuid[]),
  public.worker_heartbeat(text, uuid[], uuid[], integer, text[], integer, integer),
  public.prune_jobs(bigint, bigint, integer, integer)
to service_role;

-- The one function a signed-in user may call: it checks auth.uid() itself.
grant execute on function public.cancel_my_job(uuid) to authenticated;

notify pgrst, 'reload schema';
