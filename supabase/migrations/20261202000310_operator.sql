-- The operator's queue: cancellation, every attempt's history, retention, pause and resume, statistics whose
-- cost does not grow with the history, and the functions the CLI, the dashboard and /metrics share (one set:
-- none of them has queries of its own). Re-running this file is harmless.
--
-- Two triggers do the bookkeeping, so every path that changes a job is covered, whichever function (or an
-- operator's raw UPDATE) it takes:
-- * coding_jobs_settled (BEFORE UPDATE OF status, per row, only when a job leaves `processing` for anything
--   but `completed`) appends the attempt that just ended to the row's `attempts` (Oban's errors list: when,
--   which worker, how it ended, an error excerpt; the last ATTEMPTS_KEPT), and ends a job whose cancellation
--   was asked for as `cancelled` instead of putting it back in the queue. A completion appends nothing: the
--   row keeps that attempt in its own columns (started_at, locked_by, completed_at), so the hot path of every
--   ack costs nothing more; get_job() and list_jobs() show it as the last attempt, as they show a running one.
-- * coding_jobs_count_* (AFTER, per statement, with transition tables) append one small row per (queue, actor,
--   status) that changed to queue_stat_deltas. Appends never wait for one another, unlike counters updated in
--   place, which would serialise every claim and ack of a queue on one row. Any worker's heartbeat folds the
--   deltas into queue_stat_counts (queue_compact_stats, one at a time), so reading the counts costs the same
--   at a million rows of history as at a thousand.

-- -- Columns -------------------------------------------------------------------------------------------------
alter table public.coding_jobs add column if not exists cancel_requested_at timestamptz;
alter table public.coding_jobs add column if not exists attempts jsonb not null default '[]'::jsonb;

comment on column public.coding_jobs.cancel_requested_at is
  'When someone asked to cancel the job while it ran; its worker stops it and it ends cancelled.';
comment on column public.coding_jobs.attempts is
  'The last attempts, oldest first: {attempt, worker, started_at, ended_at, outcome, error}.';

-- Finished jobs by age, for the retention. BRIN, not a btree: it costs next to nothing per ack, where a btree
-- over every completed row adds an index insert to each one (measured: a third of the SQL side's throughput)
-- and invites plans that scan it (complete_jobs' idempotent branch picked it and read every completed row).
create index if not exists coding_jobs_completed_at_brin
  on public.coding_jobs using brin (completed_at) with (autosummarize = on);
-- Failed and cancelled jobs, newest first, for operators and the retention: few rows, never completed ones.
create index if not exists coding_jobs_unhappy_idx
  on public.coding_jobs (status, completed_at) where status in ('failed', 'cancelled');

-- -- Attempts, and cancellation at the end of an attempt --------------------------------------------------------
create or replace function public.coding_jobs_settled() returns trigger
language plpgsql set search_path = ''
as $$
declare
  attempts_kept constant integer := 20;  -- ATTEMPTS_KEPT
  excerpt_chars constant integer := 500;
  v_attempts jsonb := coalesce(old.attempts, '[]'::jsonb);
  v_outcome text;
begin
  -- A job asked to stop ends here, whatever would have sent it back to the queue or to the dead letters
  -- (a retry, a release at shutdown, a rescue after its worker died). A job that completed did run to the end.
  if old.cancel_requested_at is not null and new.status in ('pending', 'failed') then
    new.status := 'cancelled';
    new.completed_at := now();
  end if;
  v_outcome := case
    when new.status = 'cancelled' then 'cancelled'
    when new.rescue_count > old.rescue_count then 'lost'
    when new.status = 'completed' then 'completed'
    when new.status = 'failed' or new.retry_count > old.retry_count then 'failed'
    else 'released'
  end;
  if jsonb_array_length(v_attempts) >= attempts_kept then
    v_attempts := v_attempts - 0;
  end if;
  new.attempts := v_attempts || jsonb_strip_nulls(jsonb_build_object(
    'attempt', coalesce((v_attempts -> -1 ->> 'attempt')::integer, jsonb_array_length(v_attempts)) + 1,
    'worker', old.locked_by,
    'started_at', old.started_at,
    'ended_at', now(),
    'outcome', v_outcome,
    'error', case when new.error_message is distinct from old.error_message
                  then left(new.error_message, excerpt_chars) end
  ));
  return new;
end
$$;

drop trigger if exists coding_jobs_settled on public.coding_jobs;
create trigger coding_jobs_settled
  before update of status on public.coding_jobs
  for each row when (old.status = 'processing' and new.status not in ('processing', 'completed'))
  execute function public.coding_jobs_settled();

-- -- Statistics: counts kept by triggers ---------------------------------------------------------------------
create table if not exists public.queue_stat_counts (
  queue_name text not null,
  actor_name text not null,
  status public.job_status not null,
  -- rows in this status now
  jobs bigint not null,
  -- jobs that entered this status since counting began; never decreases (a counter for rates)
  entered bigint not null,
  primary key (queue_name, actor_name, status)
);

create table if not exists public.queue_stat_deltas (
  queue_name text not null,
  actor_name text not null,
  status public.job_status not null,
  jobs bigint not null,
  entered bigint not null,
  at timestamptz not null default now()
);

-- Per minute and queue: jobs that entered each status (throughput) and, for the active statuses, how many
-- there were (depth). Kept for a day; the dashboard charts the last hour.
create table if not exists public.queue_stat_minutes (
  minute timestamptz not null,
  queue_name text not null,
  status public.job_status not null,
  entered bigint not null default 0,
  depth bigint,
  primary key (minute, queue_name, status)
);

comment on table public.queue_stat_counts is
  'Jobs per queue, actor and status, kept by triggers on coding_jobs (plus queue_stat_deltas not yet folded).';

create or replace function public.coding_jobs_count_inserted() returns trigger
language plpgsql set search_path = ''
as $$
begin
  insert into public.queue_stat_deltas (queue_name, actor_name, status, jobs, entered)
  select n.queue_name, n.actor_name, n.status, count(*), count(*) from inserted n group by 1, 2, 3;
  return null;
end
$$;

create or replace function public.coding_jobs_count_updated() returns trigger
language plpgsql set search_path = ''
as $$
begin
  insert into public.queue_stat_deltas (queue_name, actor_name, status, jobs, entered)
  select d.queue_name, d.actor_name, d.status, sum(d.jobs), sum(d.entered)
    from old_rows o
    join new_rows n on n.id = o.id
   cross join lateral (values (n.queue_name, n.actor_name, n.status, 1, 1),
                              (o.queue_name, o.actor_name, o.status, -1, 0))
         as d(queue_name, actor_name, status, jobs, entered)
   where (n.status, n.queue_name, n.actor_name) is distinct from (o.status, o.queue_name, o.actor_name)
   group by 1, 2, 3
  having sum(d.jobs) <> 0 or sum(d.entered) <> 0;
  return null;
end
$$;

create or replace function public.coding_jobs_count_deleted() returns trigger
language plpgsql set search_path = ''
as $$
begin
  insert into public.queue_stat_deltas (queue_name, actor_name, status, jobs, entered)
  select o.queue_name, o.actor_name, o.status, -count(*), 0 from deleted o group by 1, 2, 3;
  return null;
end
$$;

create or replace function public.coding_jobs_count_truncated() returns trigger
language plpgsql set search_path = ''
as $$
begin
  delete from public.queue_stat_deltas;
  update public.queue_stat_counts set jobs = 0 where jobs <> 0;
  return null;
end
$$;

drop trigger if exists coding_jobs_count_inserted on public.coding_jobs;
create trigger coding_jobs_count_inserted
  after insert on public.coding_jobs referencing new table as inserted
  for each statement execute function public.coding_jobs_count_inserted();
drop trigger if exists coding_jobs_count_updated on public.coding_jobs;
create trigger coding_jobs_count_updated
  after update on public.coding_jobs referencing old table as old_rows new table as new_rows
  for each statement execute function public.coding_jobs_count_updated();
drop trigger if exists coding_jobs_count_deleted on public.coding_jobs;
create trigger coding_jobs_count_deleted
  after delete on public.coding_jobs referencing old table as deleted
  for each statement execute function public.coding_jobs_count_deleted();
drop trigger if exists coding_jobs_count_truncated on public.coding_jobs;
create trigger coding_jobs_count_truncated
  after truncate on public.coding_jobs
  for each statement execute function public.coding_jobs_count_truncated();

-- Count what is there now, once; the triggers above keep it from here. Creating them locked the table
-- against writers until this transaction commits, so nothing slips between the count and the triggers.
delete from public.queue_stat_deltas;
delete from public.queue_stat_counts;
insert into public.queue_stat_counts (queue_name, actor_name, status, jobs, entered)
select j.queue_name, j.actor_name, j.status, count(*), count(*) from public.coding_jobs j group by 1, 2, 3;

-- queue_compact_stats: fold the deltas into the counts and the per-minute rows; one caller at a time (the
-- others return 0 at once). Every worker's heartbeat calls it. Returns how many deltas it folded.
create or replace function public.queue_compact_stats() returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  folded integer;
begin
  if not pg_catalog.pg_try_advisory_xact_lock(1364675410, 1) then
    return 0;
  end if;
  -- One statement: its CTEs share a snapshot, so the depth below is the counts before plus what was taken.
  with taken as (
    delete from public.queue_stat_deltas returning queue_name, actor_name, status, jobs, entered, at
  ), counted as (
    insert into public.queue_stat_counts as c (queue_name, actor_name, status, jobs, entered)
    select t.queue_name, t.actor_name, t.status, sum(t.jobs), sum(t.entered) from taken t group by 1, 2, 3
    on conflict (queue_name, actor_name, status)
    do update set jobs = c.jobs + excluded.jobs, entered = c.entered + excluded.entered
    returning 1
  ), entered as (
    select date_trunc('minute', t.at) as minute, t.queue_name, t.status, sum(t.entered) as entered
      from taken t where t.entered <> 0 group by 1, 2, 3
  ), depth as (
    select date_trunc('minute', now()) as minute, x.queue_name, x.status, sum(x.jobs) as depth
      from (select c.queue_name, c.status, c.jobs from public.queue_stat_counts c
             where c.status in ('pending', 'processing')
            union all
            select t.queue_name, t.status, t.jobs from taken t where t.status in ('pending', 'processing')) x
     where exists (select from taken)
     group by 2, 3
  ), minutes as (
    insert into public.queue_stat_minutes as m (minute, queue_name, status, entered, depth)
    select coalesce(e.minute, d.minute), coalesce(e.queue_name, d.queue_name), coalesce(e.status, d.status),
           coalesce(e.entered, 0), d.depth
      from entered e
      full join depth d on d.minute = e.minute and d.queue_name = e.queue_name and d.status = e.status
    on conflict (minute, queue_name, status)
    do update set entered = m.entered + excluded.entered, depth = coalesce(excluded.depth, m.depth)
    returning 1
  )
  select count(*) into folded from taken;
  return folded;
end
$$;

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

-- -- What the CLI, the dashboard and /metrics read ---------------------------------------------------------------
-- get_queue_stats: jobs by queue and status, from the counts (flat in the history's size); for the active
-- statuses also the oldest job's creation, the next run time, and `oldest_due_at`: the run time of the
-- longest-waiting pending job that is due (delayed jobs wait on purpose and do not count), read from the
-- partial indexes over active jobs only.
drop function if exists public.get_queue_stats();
create function public.get_queue_stats()
returns table (queue_name text, status public.job_status, jobs bigint, oldest_created_at timestamptz,
               next_run_at timestamptz, oldest_due_at timestamptz)
language sql stable set search_path = ''
as $$
  with counted as (
    select c.queue_name, c.status, sum(c.jobs)::bigint as jobs
      from (select s.queue_name, s.status, s.jobs from public.queue_stat_counts s
            union all
            select d.queue_name, d.status, d.jobs from public.queue_stat_deltas d) c
     group by 1, 2
    having sum(c.jobs) <> 0
  ), active as (
    -- One branch per status, so that each reads its partial index (active jobs only).
    select j.queue_name, j.status, min(j.created_at) as oldest_created_at, min(j.run_at) as next_run_at,
           min(j.run_at) filter (where j.run_at <= now()) as oldest_due_at
      from public.coding_jobs j where j.status = 'pending' group by 1, 2
    union all
    select j.queue_name, j.status, min(j.created_at), min(j.run_at), null
      from public.coding_jobs j where j.status = 'processing' group by 1, 2
  )
  select c.queue_name, c.status, c.jobs, a.oldest_created_at, a.next_run_at, a.oldest_due_at
    from counted c left join active a on a.queue_name = c.queue_name and a.status = c.status
   order by c.queue_name, c.status
$$;

-- get_actor_stats: jobs by queue, actor and status now, and how many ever entered each status (a counter).
create or replace function public.get_actor_stats()
returns table (queue_name text, actor_name text, status public.job_status, jobs bigint, entered bigint)
language sql stable set search_path = ''
as $$
  select c.queue_name, c.actor_name, c.status, sum(c.jobs)::bigint, sum(c.entered)::bigint
    from (select s.queue_name, s.actor_name, s.status, s.jobs, s.entered from public.queue_stat_counts s
          union all
          select d.queue_name, d.actor_name, d.status, d.jobs, d.entered from public.queue_stat_deltas d) c
   group by 1, 2, 3
  having sum(c.jobs) <> 0 or sum(c.entered) <> 0
   order by 1, 2, 3
$$;

-- get_queue_history: per minute of the last p_minutes and per queue, the jobs that entered each status and the
-- depth of the active statuses, for the dashboard's charts.
create or replace function public.get_queue_history(p_minutes integer default 60)
returns table (minute timestamptz, queue_name text, status public.job_status, entered bigint, depth bigint)
language sql stable set search_path = ''
as $$
  with since as (
    select date_trunc('minute', now()) - (least(greatest(p_minutes, 1), 1440) - 1) * interval '1 minute' as at
  ), rows as (
    select m.minute, m.queue_name, m.status, m.entered, m.depth
      from public.queue_stat_minutes m, since s where m.minute >= s.at
    union all
    select date_trunc('minute', d.at), d.queue_name, d.status, d.entered, null
      from public.queue_stat_deltas d, since s where d.at >= s.at and d.entered <> 0
  )
  select r.minute, r.queue_name, r.status, sum(r.entered)::bigint, max(r.depth)
    from rows r group by 1, 2, 3 order by 1, 2, 3
$$;

-- get_workers: the registered workers and the jobs each holds now.
create or replace function public.get_workers()
returns table (worker_id text, hostname text, pid integer, presence text, queues text[], concurrency integer,
               started_at timestamptz, heartbeat_at timestamptz, lost_at timestamptz, jobs uuid[])
language sql stable set search_path = ''
as $$
  select w.worker_id, w.hostname, w.pid, w.presence, w.queues, w.concurrency, w.started_at, w.heartbeat_at,
         w.lost_at,
         array(select j.id from public.coding_jobs j
                where j.status = 'processing' and j.locked_by = w.worker_id order by j.started_at)
    from public.queue_workers w
   order by w.started_at, w.worker_id
$$;

-- list_jobs: jobs matching every given filter (status, queue, actor, a piece of the error text, a user), at most
-- p_limit, status by status (pending ones in claim order, running ones oldest first, finished ones newest
-- first). Each status is read through its own index; the prompt and the error come as excerpts.
create or replace function public.list_jobs(
  p_status public.job_status default null, p_queue text default null, p_actor text default null,
  p_error text default null, p_user_id uuid default null, p_limit integer default 50
) returns table (id uuid, queue_name text, actor_name text, status public.job_status, priority integer,
                 retry_count integer, max_retries integer, rescue_count integer, user_id uuid,
                 created_at timestamptz, run_at timestamptz, started_at timestamptz,
                 completed_at timestamptz, locked_by text, lease_expires_at timestamptz,
                 cancel_requested_at timestamptz, attempts integer, error text, prompt text)
language plpgsql stable set search_path = ''
as $$
declare
  v_limit integer := least(greatest(coalesce(p_limit, 50), 1), 1000);
  v_status public.job_status;
  v_window interval;
  v_found integer;
  v_rows integer;
  -- The status is spelled into each statement, so that the planner picks that status's index.
  v_where constant text := '
        where j.status = %L
          and ($1::text is null or j.queue_name = $1)
          and ($2::text is null or j.actor_name = $2)
          and ($3::text is null or strpos(lower(j.error_message), lower($3)) > 0)
          and ($4::uuid is null or j.user_id = $4)
          and ($6::interval is null or j.completed_at > now() - $6)';
begin
  foreach v_status in array case when p_status is null then enum_range(null::public.job_status)
                                 else array[p_status] end loop
    v_window := null;
    if v_status = 'completed' then
      -- No btree orders completed jobs (acks stay cheap): look back an hour, a day, a week through the BRIN
      -- index on completed_at, and read them all only when those hold too few.
      foreach v_window in array array['1 hour', '1 day', '7 days']::interval[] loop
        execute format('select count(*) from (select from public.coding_jobs j' || v_where || ' limit $5) x',
                       v_status)
          into v_found using p_queue, p_actor, p_error, p_user_id, v_limit, v_window;
        exit when v_found >= v_limit;
      end loop;
      if v_found < v_limit then
        v_window := null;
      end if;
    end if;
    return query execute format(
      'select j.id, j.queue_name, j.actor_name, j.status, j.priority, j.retry_count, j.max_retries,
              j.rescue_count, j.user_id, j.created_at, j.run_at, j.started_at, j.completed_at, j.locked_by,
              j.lease_expires_at, j.cancel_requested_at,
              jsonb_array_length(j.attempts) + case when j.status in (''processing'', ''completed'') then 1 else 0 end,
              left(j.error_message, 300), left(j.prompt, 120)
         from public.coding_jobs j' || v_where || '
        order by %s
        limit $5',
      v_status,
      case v_status when 'pending' then 'j.priority desc, j.created_at'
                    when 'processing' then 'j.started_at'
                    else 'j.completed_at desc' end)
      using p_queue, p_actor, p_error, p_user_id, v_limit, v_window;
    get diagnostics v_rows = row_count;
    v_limit := v_limit - v_rows;
    exit when v_limit <= 0;
  end loop;
end
$$;

-- get_job: one job with its attempts (the last ATTEMPTS_KEPT that ended otherwise, then a running or completed
-- one from the row's own columns); the prompt as an excerpt and its length.
create or replace function public.get_job(p_job_id uuid)
returns table (id uuid, queue_name text, actor_name text, status public.job_status, priority integer,
               retry_count integer, max_retries integer, rescue_count integer, user_id uuid, session_id uuid,
               project_id uuid, created_at timestamptz, run_at timestamptz, started_at timestamptz,
               completed_at timestamptz, locked_by text, lease_expires_at timestamptz,
               cancel_requested_at timestamptz, error_message text, prompt text, prompt_length integer,
               options jsonb, attempts jsonb)
language sql stable set search_path = ''
as $$
  select j.id, j.queue_name, j.actor_name, j.status, j.priority, j.retry_count, j.max_retries, j.rescue_count,
         j.user_id, j.session_id, j.project_id, j.created_at, j.run_at, j.started_at, j.completed_at,
         j.locked_by, j.lease_expires_at, j.cancel_requested_at, j.error_message, left(j.prompt, 200),
         length(j.prompt), j.options,
         -- a running or completed job's current (or last) attempt lives in its own columns
         case when j.status in ('processing', 'completed') then j.attempts || jsonb_strip_nulls(jsonb_build_object(
                'attempt', coalesce((j.attempts -> -1 ->> 'attempt')::integer, 0) + 1,
                'worker', j.locked_by,
                'started_at', j.started_at,
                'ended_at', j.completed_at,
                'outcome', case when j.status = 'completed' then 'completed' else 'running' end))
              else j.attempts end
    from public.coding_jobs j where j.id = p_job_id
$$;

-- retry_jobs: put finished jobs (failed by default, or cancelled) back in the queue with a fresh retry and
-- rescue budget, chosen by ids, queue, actor or a piece of the error text (every given filter holds). With no
-- filter at all it refuses, unless p_all says every such job is meant. p_dry_run answers what it would retry
-- and changes nothing. At most p_limit jobs per call, oldest first; their attempts are kept.
create or replace function public.retry_jobs(
  p_job_ids uuid[] default null, p_queue text default null, p_actor text default null,
  p_error text default null, p_status public.job_status default 'failed', p_all boolean default false,
  p_dry_run boolean default false, p_limit integer default 1000
) returns table (id uuid, queue_name text, actor_name text, status public.job_status, error text)
language plpgsql volatile set search_path = ''
as $$
begin
  if p_status is null or p_status not in ('failed', 'cancelled') then
    raise exception 'retry_jobs retries failed or cancelled jobs, not %', coalesce(p_status::text, 'null')
      using errcode = '22023';
  end if;
  if p_job_ids is null and p_queue is null and p_actor is null and p_error is null and not p_all then
    raise exception 'retry_jobs needs ids, a queue, an actor or error text (or p_all => true)'
      using errcode = '22023';
  end if;
  if p_dry_run then
    return query
    select j.id, j.queue_name, j.actor_name, j.status, left(j.error_message, 300)
      from public.coding_jobs j
     where j.status = p_status
       and (p_job_ids is null or j.id = any(p_job_ids))
       and (p_queue is null or j.queue_name = p_queue)
       and (p_actor is null or j.actor_name = p_actor)
       and (p_error is null or strpos(lower(j.error_message), lower(p_error)) > 0)
     order by j.completed_at
     limit least(greatest(p_limit, 1), 100000);
    return;
  end if;
  return query
  with chosen as (
    select j.id
      from public.coding_jobs j
     where j.status = p_status
       and (p_job_ids is null or j.id = any(p_job_ids))
       and (p_queue is null or j.queue_name = p_queue)
       and (p_actor is null or j.actor_name = p_actor)
       and (p_error is null or strpos(lower(j.error_message), lower(p_error)) > 0)
     order by j.completed_at
     limit least(greatest(p_limit, 1), 100000)
       for update skip locked
  ), retried as (
    update public.coding_jobs j
       set status = 'pending', retry_count = 0, rescue_count = 0, run_at = now(), completed_at = null,
           started_at = null, claim_token = null, locked_by = null, lease_expires_at = null,
           cancel_requested_at = null
      from chosen c
     where j.id = c.id
    returning j.id, j.queue_name, j.actor_name, j.status, left(j.error_message, 300) as error, j.run_at
  ), rung as (
    select public.coding_jobs_ring(r.queue_name, min(r.run_at)) from retried r group by r.queue_name
  )
  select r.id, r.queue_name, r.actor_name, r.status, r.error from retried r
   where (select count(*) from rung) >= 0
   order by r.id;
end
$$;

-- -- Grants ----------------------------------------------------------------------------------------------------
alter table public.queue_stat_counts enable row level security;
alter table public.queue_stat_deltas enable row level security;
alter table public.queue_stat_minutes enable row level security;
alter table public.queue_pauses enable row level security;
revoke all on table public.queue_stat_counts, public.queue_stat_deltas, public.queue_stat_minutes,
  public.queue_pauses from public, anon, authenticated;
grant select, insert, update, delete on table public.queue_stat_counts, public.queue_stat_deltas,
  public.queue_stat_minutes, public.queue_pauses to service_role;

revoke all on function
  public.coding_jobs_settled(),
  public.coding_jobs_count_inserted(),
  public.coding_jobs_count_updated(),
  public.coding_jobs_count_deleted(),
  public.coding_jobs_count_truncated(),
  public.queue_compact_stats(),
  public.pause_queue(text, text),
  public.resume_queue(text),
  public.get_paused_queues(),
  public.coding_jobs_ring_cancel(uuid),
  public.coding_jobs_cancel(uuid[], text, uuid),
  public.cancel_jobs(uuid[], text),
  public.cancel_my_job(uuid),
  public.cancel_held_jobs(uuid[], uuid[]),
  public.worker_heartbeat(text, uuid[], uuid[], integer, text[], integer, integer),
  public.prune_jobs(bigint, bigint, integer, integer),
  public.get_queue_stats(),
  public.get_actor_stats(),
  public.get_queue_history(integer),
  public.get_workers(),
  public.list_jobs(public.job_status, text, text, text, uuid, integer),
  public.get_job(uuid),
  public.retry_jobs(uuid[], text, text, text, public.job_status, boolean, boolean, integer)
from public, anon, authenticated;

grant execute on function
  public.queue_compact_stats(),
  public.pause_queue(text, text),
  public.resume_queue(text),
  public.get_paused_queues(),
  public.coding_jobs_ring_cancel(uuid),
  public.coding_jobs_cancel(uuid[], text, uuid),
  public.cancel_jobs(uuid[], text),
  public.cancel_held_jobs(uuid[], uuid[]),
  public.worker_heartbeat(text, uuid[], uuid[], integer, text[], integer, integer),
  public.prune_jobs(bigint, bigint, integer, integer),
  public.get_queue_stats(),
  public.get_actor_stats(),
  public.get_queue_history(integer),
  public.get_workers(),
  public.list_jobs(public.job_status, text, text, text, uuid, integer),
  public.get_job(uuid),
  public.retry_jobs(uuid[], text, text, text, public.job_status, boolean, boolean, integer)
to service_role;

-- The one function a signed-in user may call: it checks auth.uid() itself.
grant execute on function public.cancel_my_job(uuid) to authenticated;

notify pgrst, 'reload schema';
