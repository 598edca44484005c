-- The job lifecycle under faults: a registry of live workers, rescues that do not spend a job's retries,
-- idempotent claims, a fence without holes, bounded priorities and the prompt stored once.
-- Re-running this file is harmless.
--
-- How a dead worker's jobs come back (modelled on Oban's Lifeline and River's rescuer, with PostgreSQL's own
-- knowledge of dead sessions instead of a long timeout):
-- * Every worker process registers in queue_workers. On a direct or session-pooled connection it holds a
--   session advisory lock (namespace 1364675410, 'QWKR', key lock_id) on one connection for its whole life:
--   PostgreSQL drops the lock the moment that session ends, whether the process was SIGKILLed, OOM-killed or
--   its host vanished (TCP keepalives). Behind a transaction pooler or over the REST API a worker cannot keep a
--   session, so it heartbeats instead and declares how long it may stay silent (stale_after_ms).
-- * Any worker's heartbeat runs rescue_jobs(): workers whose lock has been gone for p_grace_ms, or whose
--   heartbeat is stale, are dead; their processing jobs go back to pending at once, counting a rescue
--   (rescue_count), never a retry. A job that has killed its worker p_max_rescues times is dead-lettered
--   (poison-pill protection). Expired leases are rescued the same way (a frozen worker, a legacy caller).
-- * The grace is what lets a worker survive a dropped connection: it takes its lock again on a new session
--   within the grace, and a worker that cannot stops its running jobs before the grace is over.

-- -- Columns and constraints ---------------------------------------------------------------------------------
alter table public.coding_jobs add column if not exists rescue_count integer not null default 0;

comment on column public.coding_jobs.rescue_count is
  'Times the job came back because its worker died or stopped renewing its lease; apart from retry_count.';

-- Priority is a plan tier: Free 0, Starter 5, Pro/Enterprise 10. A value outside the tiers (2^31 - 1 from a
-- bad insert) would jump every other job; rows that already hold one are clamped into the range first.
update public.coding_jobs set priority = least(greatest(priority, 0), 10) where priority not between 0 and 10;
do $$
begin
  alter table public.coding_jobs
    add constraint coding_jobs_priority_check check (priority between 0 and 10);
exception
  when duplicate_object then null;
end
$$;

do $$
begin
  alter table public.coding_jobs add constraint coding_jobs_rescues_check check (rescue_count >= 0);
exception
  when duplicate_object then null;
end
$$;

-- A worker's processing jobs, for its heartbeat's sweep and for rescues; a claim's jobs, for a retried claim.
create index if not exists coding_jobs_holder_idx
  on public.coding_jobs (locked_by) where status = 'processing';
create index if not exists coding_jobs_claim_token_idx
  on public.coding_jobs (claim_token) where status = 'processing';

-- -- The prompt, stored once ---------------------------------------------------------------------------------
-- The prompt lives in its column only. Rows from the Edge Function get kwargs without it; a Python producer's
-- kwargs.prompt (a string) moves into the column. Workers put it back into the kwargs when they claim the row
-- (claim_jobs below, and the worker's decoding).
create or replace function public.coding_jobs_fill_payload() returns trigger
language plpgsql set search_path = ''
as $$
begin
  if new.kwargs is null then
    new.kwargs := jsonb_strip_nulls(jsonb_build_object(
      'session_id', new.session_id,
      'project_id', new.project_id,
      'user_id', new.user_id
    ));
  elsif jsonb_typeof(new.kwargs) = 'object' then
    if jsonb_typeof(new.kwargs -> 'prompt') = 'string' then
      new.prompt := coalesce(new.prompt, new.kwargs ->> 'prompt');
      new.kwargs := new.kwargs - 'prompt';
    end if;
    new.session_id := coalesce(new.session_id, public.coding_jobs_uuid_or_null(new.kwargs ->> 'session_id'));
    new.project_id := coalesce(new.project_id, public.coding_jobs_uuid_or_null(new.kwargs ->> 'project_id'));
    new.user_id := coalesce(new.user_id, public.coding_jobs_uuid_or_null(new.kwargs ->> 'user_id'));
  end if;
  return new;
end
$$;

-- -- The worker registry -------------------------------------------------------------------------------------
create sequence if not exists public.queue_worker_lock_ids as integer minvalue 1 cycle;

create table if not exists public.queue_workers (
  worker_id text primary key,
  -- the key of the session advisory lock a 'lock' worker holds: pg_advisory_lock(1364675410, lock_id)
  lock_id integer not null,
  presence text not null check (presence in ('lock', 'heartbeat')),
  -- how long a 'heartbeat' worker may stay silent before it counts as dead
  stale_after_ms integer not null check (stale_after_ms > 0),
  hostname text,
  pid integer,
  queues text[] not null default '{}',
  concurrency integer,
  started_at timestamptz not null default now(),
  heartbeat_at timestamptz not null default now(),
  -- when a rescuer first found a 'lock' worker's lock gone; cleared when the worker takes its lock again
  lost_at timestamptz
);

comment on table public.queue_workers is
  'Live worker processes. Rows come and go through register_worker, worker_heartbeat and rescue_jobs.';

-- queue_worker_lock_held: is a worker's session advisory lock held by any session of this database?
create or replace function public.queue_worker_lock_held(p_lock_id integer) returns boolean
language sql stable set search_path = ''
as $$
  select exists (
    select from pg_catalog.pg_locks l
     where l.locktype = 'advisory' and l.granted
       and l.database = (select d.oid from pg_catalog.pg_database d where d.datname = pg_catalog.current_database())
       and l.classid = 1364675410::oid and l.objid = p_lock_id::oid and l.objsubid = 2
  )
$$;

-- register_worker: add (or refresh, after a reconnect) a worker. A 'lock' worker calls it on the connection
-- it keeps for its whole life: the function takes the session lock there, with a fresh key every time, so an
-- old session of the same worker that the server has not noticed dying yet never blocks it.
create or replace function public.register_worker(
  p_worker_id text, p_presence text, p_stale_after_ms integer, p_hostname text default null,
  p_pid integer default null, p_queues text[] default '{}', p_concurrency integer default null
) returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  v_lock_id integer := nextval('public.queue_worker_lock_ids');
begin
  if p_presence = 'lock' and not pg_catalog.pg_try_advisory_lock(1364675410, v_lock_id) then
    raise exception 'worker lock % is taken', v_lock_id;
  end if;
  insert into public.queue_workers as w
         (worker_id, lock_id, presence, stale_after_ms, hostname, pid, queues, concurrency)
  values (p_worker_id, v_lock_id, p_presence, p_stale_after_ms, p_hostname, p_pid,
          coalesce(p_queues, '{}'), p_concurrency)
  on conflict (worker_id) do update
     set lock_id = excluded.lock_id, presence = excluded.presence, stale_after_ms = excluded.stale_after_ms,
         hostname = excluded.hostname, pid = excluded.pid,
         queues = case when cardinality(excluded.queues) > 0 then excluded.queues else w.queues end,
         concurrency = coalesce(excluded.concurrency, w.concurrency), heartbeat_at = now(), lost_at = null;
  return v_lock_id;
end
$$;

-- rescue_jobs: return the jobs of dead workers, and jobs whose lease expired, to pending (counting a rescue),
-- or dead-letter those that have killed their worker p_max_rescues times. One rescuer at a time: the others
-- return 0 at once. Returns how many jobs moved.
create or replace function public.rescue_jobs(
  p_max_rescues integer default 5, p_grace_ms integer default 2000, p_limit integer default 1000
) returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  moved integer;
  dead text[];
begin
  if not pg_catalog.pg_try_advisory_xact_lock(1364675410, 0) then
    return 0;
  end if;
  -- A lock worker whose lock is gone: note when that was first seen, so a dropped connection has the grace
  -- to take it again.
  update public.queue_workers w set lost_at = now()
   where w.presence = 'lock' and w.lost_at is null and not public.queue_worker_lock_held(w.lock_id);
  with gone as (
    delete from public.queue_workers w
     where (w.presence = 'lock' and not public.queue_worker_lock_held(w.lock_id)
            and least(w.lost_at, w.heartbeat_at) <= now() - p_grace_ms * interval '1 millisecond')
        or (w.presence = 'heartbeat' and w.heartbeat_at <= now() - w.stale_after_ms * interval '1 millisecond')
    returning w.worker_id
  )
  select coalesce(array_agg(g.worker_id), '{}') into dead from gone g;

  with stranded as (
    select j.id
      from public.coding_jobs j
     where j.status = 'processing' and (j.locked_by = any(dead) or j.lease_expires_at < now())
     order by j.lease_expires_at
     limit p_limit
       for update skip locked
  ), moved_jobs as (
    update public.coding_jobs j
       set status = case when j.rescue_count + 1 >= p_max_rescues
                         then 'failed'::public.job_status else 'pending'::public.job_status end,
           rescue_count = j.rescue_count + 1,
           error_message = case
             when j.rescue_count + 1 >= p_max_rescues then format(
               'dead-lettered: its worker died or stopped renewing its lease %s times while running it '
               '(last: worker %s); a job that keeps killing its worker is not run again',
               j.rescue_count + 1, coalesce(j.locked_by, 'unknown'))
             when j.locked_by = any(dead) then format('rescued: worker %s died while running it', j.locked_by)
             else format('rescued: the lease held by worker %s expired at %s',
                         coalesce(j.locked_by, 'unknown'), j.lease_expires_at)
           end,
           run_at = case when j.rescue_count + 1 >= p_max_rescues then j.run_at else now() end,
           completed_at = case when j.rescue_count + 1 >= p_max_rescues then now() end,
           locked_by = null, claim_token = null, lease_expires_at = null, started_at = null
      from stranded s
     where j.id = s.id
    returning j.queue_name, j.run_at, j.status
  ), rung as (
    select public.coding_jobs_ring(queue_name, min(run_at))
      from moved_jobs where status = 'pending' group by queue_name
  )
  select (select count(*) from moved_jobs) into moved from (select count(*) from rung) r;
  return moved;
end
$$;

-- worker_heartbeat: a worker's one periodic call. It notes the worker alive, extends the leases of the jobs it
-- holds (when p_lease_ms is given), returns the ones it still holds (a job missing from `held` was rescued or
-- taken from it: the worker stops running it), hands back jobs claimed for it that it does not hold (a claim
-- whose reply was lost) after p_orphan_after_ms, and runs the rescue. `registered` is false when the worker
-- is not in the registry (it was declared dead): it must register again before it claims.
create or replace function public.worker_heartbeat(
  p_worker_id text, p_job_ids uuid[], p_claim_tokens uuid[], p_lease_ms integer default null,
  p_queues text[] default null, p_max_rescues integer default 5, p_orphan_after_ms integer default 30000
) returns table (registered boolean, held uuid[], rescued integer)
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
  return next;
end
$$;

-- deregister_worker: a worker that stopped cleanly leaves the registry. One that still holds jobs (threads that
-- did not stop by the shutdown deadline) stays until its lock goes with its process, or, for a heartbeat worker,
-- until p_rescue_after_ms have passed: its jobs are rescued then, never while its threads may still run them.
create or replace function public.deregister_worker(p_worker_id text, p_rescue_after_ms integer default 2000)
returns void
language plpgsql volatile set search_path = ''
as $$
begin
  if exists (select from public.coding_jobs j where j.status = 'processing' and j.locked_by = p_worker_id) then
    update public.queue_workers w
       set heartbeat_at = least(w.heartbeat_at,
             now() - (w.stale_after_ms - p_rescue_after_ms) * interval '1 millisecond')
     where w.worker_id = p_worker_id and w.presence = 'heartbeat';
  else
    delete from public.queue_workers w where w.worker_id = p_worker_id;
  end if;
end
$$;

-- -- Claims ----------------------------------------------------------------------------------------------------
-- claim_jobs with a claim token chosen by the caller: calling it again with the same token (its reply was lost)
-- answers the jobs the first call claimed instead of claiming more. Only a registered worker that has not been
-- found lost claims anything. The prompt comes in its column only; the worker puts it into the kwargs.
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
  if not exists (
    select from public.queue_workers w where w.worker_id = p_worker_id and w.lost_at is null
  ) then
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

-- The earlier claim_jobs, for workers of the previous version during a rolling deploy: they read the prompt
-- from the kwargs, so it is put back there.
create or replace function public.claim_jobs(
  p_worker_id text, p_queue text, p_limit integer, p_lease_ms integer default 60000
) returns setof public.coding_jobs
language plpgsql volatile set search_path = ''
as $$
begin
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

-- -- Settling, fenced by the claim -----------------------------------------------------------------------------
-- Every settling function needs the claim token of the claim it settles. The one exception keeps the seed's
-- contract: a job claimed through claim_next_job() (locked_by 'claim_next_job') may be settled by id alone, as
-- its callers always did; a job a worker holds never is.
create or replace function public.coding_jobs_claim_matches(
  p_locked_by text, p_claim_token uuid, p_given_token uuid
) returns boolean
language sql immutable set search_path = ''
as $$
  select case when p_given_token is null then p_locked_by = 'claim_next_job'
              else p_claim_token = p_given_token end
$$;

create or replace function public.complete_job(job_id uuid, p_claim_token uuid default null) returns boolean
language plpgsql volatile set search_path = ''
as $$
begin
  update public.coding_jobs j
     set status = 'completed', completed_at = now(), lease_expires_at = null
   where j.id = job_id and j.status = 'processing'
     and public.coding_jobs_claim_matches(j.locked_by, j.claim_token, p_claim_token);
  return found or exists (
    select from public.coding_jobs j
     where j.id = job_id and j.status = 'completed' and j.claim_token = p_claim_token);
end
$$;

create or replace function public.retry_job(
  job_id uuid, p_claim_token uuid, p_delay_ms bigint, error_msg text, p_options jsonb default null
) returns boolean
language plpgsql volatile set search_path = ''
as $$
declare
  job record;
begin
  update public.coding_jobs j
     set status = 'pending',
         retry_count = j.retry_count + 1,
         error_message = error_msg,
         run_at = now() + greatest(p_delay_ms, 0) * interval '1 millisecond',
         options = coalesce(p_options, j.options),
         locked_by = null, claim_token = null, lease_expires_at = null, started_at = null
   where j.id = job_id and j.status = 'processing'
     and public.coding_jobs_claim_matches(j.locked_by, j.claim_token, p_claim_token)
  returning j.queue_name, j.run_at into job;
  if job is null then
    return false;
  end if;
  perform public.coding_jobs_ring(job.queue_name, job.run_at);
  return true;
end
$$;

create or replace function public.dead_letter_job(job_id uuid, p_claim_token uuid, error_msg text)
returns boolean
language plpgsql volatile set search_path = ''
as $$
begin
  update public.coding_jobs j
     set status = 'failed', error_message = error_msg, completed_at = now(), lease_expires_at = null
   where j.id = job_id and j.status = 'processing'
     and public.coding_jobs_claim_matches(j.locked_by, j.claim_token, p_claim_token);
  return found or exists (
    select from public.coding_jobs j
     where j.id = job_id and j.status = 'failed' and j.claim_token = p_claim_token);
end
$$;

create or replace function public.fail_job(job_id uuid, error_msg text, p_claim_token uuid default null)
returns public.job_status
language plpgsql volatile set search_path = ''
as $$
declare
  job record;
begin
  select j.retry_count, j.max_retries into job
    from public.coding_jobs j
   where j.id = job_id and j.status = 'processing'
     and public.coding_jobs_claim_matches(j.locked_by, j.claim_token, p_claim_token)
     for update;
  if job is null then
    return null;
  end if;
  if job.retry_count < job.max_retries then
    perform public.retry_job(job_id, p_claim_token, least(15000 * power(2, job.retry_count), 3600000)::bigint,
                             error_msg);
    return 'pending';
  end if;
  perform public.dead_letter_job(job_id, p_claim_token, error_msg);
  return 'failed';
end
$$;

-- postpone_job: processing -> pending after p_delay_ms with no retry or rescue counted, a note in
-- error_message and, when given, new options. For jobs this worker cannot run yet (an actor only newer
-- workers know, during a rolling deploy).
create or replace function public.postpone_job(
  job_id uuid, p_claim_token uuid, p_delay_ms bigint, p_note text, p_options jsonb default null
) returns boolean
language plpgsql volatile set search_path = ''
as $$
declare
  job record;
begin
  update public.coding_jobs j
     set status = 'pending',
         error_message = p_note,
         run_at = now() + greatest(p_delay_ms, 0) * interval '1 millisecond',
         options = coalesce(p_options, j.options),
         locked_by = null, claim_token = null, lease_expires_at = null, started_at = null
   where j.id = job_id and j.status = 'processing' and j.claim_token = p_claim_token
  returning j.queue_name, j.run_at into job;
  if job is null then
    return false;
  end if;
  perform public.coding_jobs_ring(job.queue_name, job.run_at);
  return true;
end
$$;

-- The earlier rescue, for workers of the previous version during a rolling deploy: the same rescue, which
-- now counts rescues instead of retries.
create or replace function public.requeue_expired_leases(p_queue text default null, p_limit integer default 1000)
returns integer
language sql volatile set search_path = ''
as $$
  select public.rescue_jobs(5, 2000, p_limit)
$$;

-- queue_probe_doorbell: a ring that wakes nobody, for a worker to check that its LISTEN connection still hears
-- the doorbell (a connection can die silently, and a transaction pooler never delivers notifications).
create or replace function public.queue_probe_doorbell(p_probe text) returns void
language sql volatile set search_path = ''
as $$
  select pg_notify('coding_jobs', json_build_object('probe', p_probe)::text)
$$;

-- get_queue_consumers: how many registered workers consume each queue; a queue with pending jobs and none
-- is a queue nobody will ever empty (a typo in a producer, a worker started with the wrong --queues).
create or replace function public.get_queue_consumers() returns table (queue_name text, workers bigint)
language sql stable set search_path = ''
as $$
  select q.name, count(*) from public.queue_workers w, unnest(w.queues) as q(name) group by q.name order by 1
$$;

-- -- Grants ----------------------------------------------------------------------------------------------------
alter table public.queue_workers enable row level security;
revoke all on table public.queue_workers from public, anon, authenticated;
grant select, insert, update, delete on table public.queue_workers to service_role;
revoke all on sequence public.queue_worker_lock_ids from public, anon, authenticated;
grant usage on sequence public.queue_worker_lock_ids to service_role;

revoke all on function
  public.queue_worker_lock_held(integer),
  public.register_worker(text, text, integer, text, integer, text[], integer),
  public.rescue_jobs(integer, integer, integer),
  public.worker_heartbeat(text, uuid[], uuid[], integer, text[], integer, integer),
  public.deregister_worker(text, integer),
  public.claim_jobs(text, text, integer, integer, uuid),
  public.coding_jobs_claim_matches(text, uuid, uuid),
  public.postpone_job(uuid, uuid, bigint, text, jsonb),
  public.queue_probe_doorbell(text),
  public.get_queue_consumers()
from public, anon, authenticated;

grant execute on function
  public.queue_worker_lock_held(integer),
  public.register_worker(text, text, integer, text, integer, text[], integer),
  public.rescue_jobs(integer, integer, integer),
  public.worker_heartbeat(text, uuid[], uuid[], integer, text[], integer, integer),
  public.deregister_worker(text, integer),
  public.claim_jobs(text, text, integer, integer, uuid),
  public.coding_jobs_claim_matches(text, uuid, uuid),
  public.postpone_job(uuid, uuid, bigint, text, jsonb),
  public.queue_probe_doorbell(text),
  public.get_queue_consumers()
to service_role;

notify pgrst, 'reload schema';
