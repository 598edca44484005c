-- The coding_jobs queue: table, indexes, doorbell, state-changing functions and grants.
-- Every state change of a job goes through one of the functions below. Re-running this file is harmless.

do $$
begin
  create type public.job_status as enum ('pending', 'processing', 'completed', 'failed');
exception
  when duplicate_object then null;
end
$$;

create table if not exists public.coding_jobs (
  id uuid primary key default gen_random_uuid(),
  -- the web app's domain columns: the Edge Function inserts only these
  session_id uuid,
  project_id uuid,
  user_id uuid,
  prompt text,
  status public.job_status not null default 'pending',
  priority integer not null default 0,  -- Free 0, Starter 5, Pro/Enterprise 10; higher runs first
  retry_count integer not null default 0,
  max_retries integer not null default 3,
  error_message text,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  completed_at timestamptz,
  -- the Dramatiq message; kwargs left null are filled from the domain columns on insert
  queue_name text not null default 'default',
  actor_name text not null default 'run_coding_job',
  args jsonb not null default '[]'::jsonb,
  kwargs jsonb,
  options jsonb not null default '{}'::jsonb,
  run_at timestamptz not null default now(),  -- the earliest time the job may run
  -- the lease: who holds a processing job, with which claim, until when
  locked_by text,
  claim_token uuid,
  lease_expires_at timestamptz,
  constraint coding_jobs_retries_check check (max_retries >= 0 and retry_count >= 0),
  -- a processing job always has a holder; a finished job keeps its last claim token, so a repeated ack of
  -- the same claim (its first reply was lost) is recognised as done
  constraint coding_jobs_lease_check check (
    status <> 'processing' or (claim_token is not null and lease_expires_at is not null)
  ),
  constraint coding_jobs_no_lease_unless_processing check (status = 'processing' or lease_expires_at is null)
);

comment on table public.coding_jobs is 'The job queue. Change rows only through the queue functions.';
comment on column public.coding_jobs.claim_token is 'Fresh on every claim; fences acks from a holder that lost the job.';

-- Claims are index scans on pending rows only, however many completed rows pile up.
create index if not exists coding_jobs_claim_idx
  on public.coding_jobs (queue_name, priority desc, created_at) where status = 'pending';
create index if not exists coding_jobs_claim_any_queue_idx
  on public.coding_jobs (priority desc, created_at) where status = 'pending';
create index if not exists coding_jobs_lease_idx
  on public.coding_jobs (lease_expires_at) where status = 'processing';
create index if not exists coding_jobs_user_idx
  on public.coding_jobs (user_id, created_at desc);

create or replace function public.coding_jobs_uuid_or_null(value text) returns uuid
language sql immutable set search_path = ''
as $$
  select case
    when value ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then value::uuid
  end
$$;

-- Rows from the Edge Function carry only domain columns: give them the coding actor's kwargs.
-- Rows from Python producers carry kwargs: copy the domain values they hold into the columns.
create or replace function public.coding_jobs_fill_payload() returns trigger
language plpgsql set search_path = ''
as $$
begin
  if new.kwargs is null then
    new.kwargs := jsonb_strip_nulls(jsonb_build_object(
      'prompt', new.prompt,
      'session_id', new.session_id,
      'project_id', new.project_id,
      'user_id', new.user_id
    ));
  elsif jsonb_typeof(new.kwargs) = 'object' then
    new.prompt := coalesce(new.prompt, new.kwargs ->> 'prompt');
    new.session_id := coalesce(new.session_id, public.coding_jobs_uuid_or_null(new.kwargs ->> 'session_id'));
    new.project_id := coalesce(new.project_id, public.coding_jobs_uuid_or_null(new.kwargs ->> 'project_id'));
    new.user_id := coalesce(new.user_id, public.coding_jobs_uuid_or_null(new.kwargs ->> 'user_id'));
  end if;
  return new;
end
$$;

drop trigger if exists coding_jobs_fill_payload on public.coding_jobs;
create trigger coding_jobs_fill_payload
  before insert on public.coding_jobs
  for each row execute function public.coding_jobs_fill_payload();

-- The doorbell: one small notification per queue and statement, never the payload.
-- Payload: {"queue": <name>, "run_at": <epoch ms of the earliest run_at, rounded up>} so idle workers can also
-- wake for delays (rounded down, a worker would wake a fraction of a millisecond early and find nothing due).
create or replace function public.coding_jobs_ring(p_queue text, p_run_at timestamptz) returns void
language sql volatile set search_path = ''
as $$
  select pg_notify(
    'coding_jobs',
    json_build_object('queue', p_queue, 'run_at', ceil(extract(epoch from p_run_at) * 1000)::bigint)::text
  )
$$;

create or replace function public.coding_jobs_ring_inserted() returns trigger
language plpgsql set search_path = ''
as $$
begin
  perform public.coding_jobs_ring(r.queue_name, r.run_at)
     from (select queue_name, min(run_at) as run_at
             from inserted where status = 'pending' group by queue_name) r;
  return null;
end
$$;

drop trigger if exists coding_jobs_ring_inserted on public.coding_jobs;
create trigger coding_jobs_ring_inserted
  after insert on public.coding_jobs
  referencing new table as inserted
  for each statement execute function public.coding_jobs_ring_inserted();

-- enqueue_jobs: insert Dramatiq messages (a JSON array of objects); a message id seen before is ignored.
create or replace function public.enqueue_jobs(p_jobs jsonb) returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  inserted integer;
begin
  insert into public.coding_jobs (id, queue_name, actor_name, args, kwargs, options, priority, max_retries, run_at)
  select coalesce(j.id, gen_random_uuid()),
         coalesce(j.queue_name, 'default'),
         j.actor_name,
         coalesce(j.args, '[]'::jsonb),
         coalesce(j.kwargs, '{}'::jsonb),
         coalesce(j.options, '{}'::jsonb),
         coalesce(j.priority, 0),
         coalesce(j.max_retries, 3),
         now() + coalesce(j.delay_ms, 0) * interval '1 millisecond'
    from jsonb_to_recordset(p_jobs) as j(
           id uuid, queue_name text, actor_name text, args jsonb, kwargs jsonb, options jsonb,
           priority integer, max_retries integer, delay_ms bigint)
  on conflict (id) do nothing;
  get diagnostics inserted = row_count;
  return inserted;
end
$$;

-- claim_jobs: up to p_limit due jobs of one queue, highest priority first, then oldest; never one job twice.
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
  select * from claimed c order by c.priority desc, c.created_at;
end
$$;

-- claim_next_job: the original single claim, from any queue; the holder must complete or fail it within a minute.
create or replace function public.claim_next_job() returns setof public.coding_jobs
language plpgsql volatile set search_path = ''
as $$
begin
  return query
  with next_job as (
    select j.id
      from public.coding_jobs j
     where j.status = 'pending' and j.run_at <= now()
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

-- complete_job: processing -> completed. With a claim token, only the claim's holder can complete it, and
-- completing it again with the same token answers true (the first reply was lost).
create or replace function public.complete_job(job_id uuid, p_claim_token uuid default null) returns boolean
language plpgsql volatile set search_path = ''
as $$
begin
  update public.coding_jobs
     set status = 'completed', completed_at = now(), lease_expires_at = null
   where id = job_id and status = 'processing' and (p_claim_token is null or claim_token = p_claim_token);
  return found or exists (
    select from public.coding_jobs
     where id = job_id and status = 'completed' and claim_token = p_claim_token);
end
$$;

-- complete_jobs: complete_job for a batch, one statement and one commit for every ack a worker has ready.
-- Returns the ids now completed by these claims (including ones an earlier, lost reply had completed).
create or replace function public.complete_jobs(p_job_ids uuid[], p_claim_tokens uuid[]) returns setof uuid
language plpgsql volatile set search_path = ''
as $$
begin
  return query
  with held as (
    select h.id, h.token from unnest(p_job_ids, p_claim_tokens) as h(id, token)
  ), done as (
    update public.coding_jobs j
       set status = 'completed', completed_at = now(), lease_expires_at = null
      from held h
     where j.id = h.id and j.claim_token = h.token and j.status = 'processing'
    returning j.id
  )
  select d.id from done d
  union all
  select j.id from public.coding_jobs j join held h on j.id = h.id and j.claim_token = h.token
   where j.status = 'completed';
end
$$;

-- retry_job: processing -> pending after p_delay_ms, counting the retry and keeping the error.
create or replace function public.retry_job(
  job_id uuid, p_claim_token uuid, p_delay_ms bigint, error_msg text, p_options jsonb default null
) returns boolean
language plpgsql volatile set search_path = ''
as $$
declare
  job record;
begin
  update public.coding_jobs
     set status = 'pending',
         retry_count = retry_count + 1,
         error_message = error_msg,
         run_at = now() + greatest(p_delay_ms, 0) * interval '1 millisecond',
         options = coalesce(p_options, options),
         locked_by = null, claim_token = null, lease_expires_at = null, started_at = null
   where id = job_id and status = 'processing' and (p_claim_token is null or claim_token = p_claim_token)
  returning queue_name, run_at into job;
  if job is null then
    return false;
  end if;
  perform public.coding_jobs_ring(job.queue_name, job.run_at);
  return true;
end
$$;

-- dead_letter_job: processing -> failed, the dead-letter state, with the error; idempotent per claim like complete_job.
create or replace function public.dead_letter_job(job_id uuid, p_claim_token uuid, error_msg text)
returns boolean
language plpgsql volatile set search_path = ''
as $$
begin
  update public.coding_jobs
     set status = 'failed', error_message = error_msg, completed_at = now(), lease_expires_at = null
   where id = job_id and status = 'processing' and (p_claim_token is null or claim_token = p_claim_token);
  return found or exists (
    select from public.coding_jobs
     where id = job_id and status = 'failed' and claim_token = p_claim_token);
end
$$;

-- fail_job: the original failure call. Retry while retry_count < max_retries (15 s, 30 s, 60 s, ... capped
-- at an hour), otherwise failed. Returns the job's new status, or null when the job was not processing.
create or replace function public.fail_job(job_id uuid, error_msg text, p_claim_token uuid default null)
returns public.job_status
language plpgsql volatile set search_path = ''
as $$
declare
  job record;
begin
  select retry_count, max_retries into job
    from public.coding_jobs
   where id = job_id and status = 'processing' and (p_claim_token is null or claim_token = p_claim_token)
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

-- release_jobs: claimed jobs that never started go back to pending at once, with no retry counted.
create or replace function public.release_jobs(p_job_ids uuid[], p_claim_tokens uuid[]) returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  released integer;
begin
  with released_jobs as (
    update public.coding_jobs j
       set status = 'pending', locked_by = null, claim_token = null, lease_expires_at = null, started_at = null
      from unnest(p_job_ids, p_claim_tokens) as h(id, token)
     where j.id = h.id and j.claim_token = h.token and j.status = 'processing'
    returning j.queue_name, j.run_at
  ), rung as (
    select public.coding_jobs_ring(queue_name, min(run_at)) from released_jobs group by queue_name
  )
  select (select count(*) from released_jobs) into released from (select count(*) from rung) r;
  return released;
end
$$;

-- extend_leases: push the leases of the jobs a worker still holds; returns the ids it still holds.
create or replace function public.extend_leases(p_job_ids uuid[], p_claim_tokens uuid[], p_lease_ms integer)
returns setof uuid
language plpgsql volatile set search_path = ''
as $$
begin
  return query
  update public.coding_jobs j
     set lease_expires_at = now() + p_lease_ms * interval '1 millisecond'
    from unnest(p_job_ids, p_claim_tokens) as h(id, token)
   where j.id = h.id and j.claim_token = h.token and j.status = 'processing'
  returning j.id;
end
$$;

-- rerun_failed_jobs: operators put dead-lettered jobs back in the queue with a fresh retry budget.
create or replace function public.rerun_failed_jobs(p_job_ids uuid[] default null, p_queue text default null)
returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  rerun integer;
begin
  with rerun_jobs as (
    update public.coding_jobs
       set status = 'pending', retry_count = 0, run_at = now(), completed_at = null, started_at = null,
           claim_token = null, locked_by = null
     where status = 'failed'
       and (p_job_ids is null or id = any(p_job_ids))
       and (p_queue is null or queue_name = p_queue)
    returning queue_name, run_at
  ), rung as (
    select public.coding_jobs_ring(queue_name, min(run_at)) from rerun_jobs group by queue_name
  )
  select (select count(*) from rerun_jobs) into rerun from (select count(*) from rung) r;
  return rerun;
end
$$;

-- purge_queue: drop the pending jobs of one queue (Dramatiq's broker.flush).
create or replace function public.purge_queue(p_queue text) returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  purged integer;
begin
  delete from public.coding_jobs where queue_name = p_queue and status = 'pending';
  get diagnostics purged = row_count;
  return purged;
end
$$;

-- get_queue_stats: job counts by queue and status, with the oldest job's creation and the next run time.
create or replace function public.get_queue_stats()
returns table (queue_name text, status public.job_status, jobs bigint, oldest_created_at timestamptz,
               next_run_at timestamptz)
language sql stable set search_path = ''
as $$
  select j.queue_name, j.status, count(*), min(j.created_at), min(j.run_at)
    from public.coding_jobs j
   group by j.queue_name, j.status
   order by j.queue_name, j.status
$$;

-- Grants: only service_role (and the owner) may run the queue or write the table;
-- signed-in users may read their own jobs under row-level security.
alter table public.coding_jobs enable row level security;

drop policy if exists "users read their own jobs" on public.coding_jobs;
create policy "users read their own jobs" on public.coding_jobs
  for select to authenticated using (user_id = (select auth.uid()));

revoke all on table public.coding_jobs from public, anon, authenticated;
grant select on table public.coding_jobs to authenticated;
grant select, insert, update, delete on table public.coding_jobs to service_role;

revoke all on function
  public.coding_jobs_uuid_or_null(text),
  public.coding_jobs_fill_payload(),
  public.coding_jobs_ring(text, timestamptz),
  public.coding_jobs_ring_inserted(),
  public.enqueue_jobs(jsonb),
  public.claim_jobs(text, text, integer, integer),
  public.claim_next_job(),
  public.complete_job(uuid, uuid),
  public.complete_jobs(uuid[], uuid[]),
  public.retry_job(uuid, uuid, bigint, text, jsonb),
  public.dead_letter_job(uuid, uuid, text),
  public.fail_job(uuid, text, uuid),
  public.release_jobs(uuid[], uuid[]),
  public.extend_leases(uuid[], uuid[], integer),
  public.rerun_failed_jobs(uuid[], text),
  public.purge_queue(text),
  public.get_queue_stats()
from public, anon, authenticated;

grant execute on function
  public.coding_jobs_uuid_or_null(text),
  public.coding_jobs_ring(text, timestamptz),
  public.enqueue_jobs(jsonb),
  public.claim_jobs(text, text, integer, integer),
  public.claim_next_job(),
  public.complete_job(uuid, uuid),
  public.complete_jobs(uuid[], uuid[]),
  public.retry_job(uuid, uuid, bigint, text, jsonb),
  public.dead_letter_job(uuid, uuid, text),
  public.fail_job(uuid, text, uuid),
  public.release_jobs(uuid[], uuid[]),
  public.extend_leases(uuid[], uuid[], integer),
  public.rerun_failed_jobs(uuid[], text),
  public.purge_queue(text),
  public.get_queue_stats()
to service_role;
