-- What the CLI, the dashboard and /metrics read, and the operator's retry: one set of functions, none of them
-- with queries of their own. Builds on the bookkeeping (counts, attempts) and the controls (pauses).
-- Re-running this file is harmless.

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
revoke all on function
  public.get_queue_stats(),
  public.get_actor_stats(),
  public.get_queue_history(integer),
  public.get_workers(),
  public.list_jobs(public.job_status, text, text, text, uuid, integer),
  public.get_job(uuid),
  public.retry_jobs(uuid[], text, text, text, public.job_status, boolean, boolean, integer)
from public, anon, authenticated;

grant execute on function
  public.get_queue_stats(),
  public.get_actor_stats(),
  public.get_queue_history(integer),
  public.get_workers(),
  public.list_jobs(public.job_status, text, text, text, uuid, integer),
  public.get_job(uuid),
  public.retry_jobs(uuid[], text, text, text, public.job_status, boolean, boolean, integer)
to service_role;

notify pgrst, 'reload schema';
