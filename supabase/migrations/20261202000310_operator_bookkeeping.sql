-- The operator's queue (issue 8), part 1 of 3: the bookkeeping. Every attempt's history, and statistics whose
-- cost does not grow with the history. Part 2 (..._operator_controls.sql) adds pause and resume, cancellation,
-- the heartbeat's cancel requests and retention; part 3 (..._operator_reads.sql) the functions the CLI, the
-- dashboard and /metrics share. Re-running this file is harmless.
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

-- -- Grants ----------------------------------------------------------------------------------------------------
alter table public.queue_stat_counts enable row level security;
alter table public.queue_stat_deltas enable row level security;
alter table public.queue_stat_minutes enable row level security;
revoke all on table public.queue_stat_counts, public.queue_stat_deltas, public.queue_stat_minutes
  from public, anon, authenticated;
grant select, insert, update, delete on table public.queue_stat_counts, public.queue_stat_deltas,
  public.queue_stat_minutes to service_role;

revoke all on function
  public.coding_jobs_settled(),
  public.coding_jobs_count_inserted(),
  public.coding_jobs_count_updated(),
  public.coding_jobs_count_deleted(),
  public.coding_jobs_count_truncated(),
  public.queue_compact_stats()
from public, anon, authenticated;

grant execute on function public.queue_compact_stats() to service_role;
