-- get_job shows what unique and periodic jobs add: the idempotency key a producer gave, kept while the job is
-- pending or running (20261202000510 releases it when the job ends); a periodic job's tick is already in its
-- options. A function's result columns cannot change in place, so it is dropped and made again, with the same
-- grants as in 20261202000330.
drop function if exists public.get_job(uuid);

create function public.get_job(p_job_id uuid)
returns table (id uuid, queue_name text, actor_name text, status public.job_status, priority integer,
               retry_count integer, max_retries integer, rescue_count integer, user_id uuid, session_id uuid,
               project_id uuid, created_at timestamptz, run_at timestamptz, started_at timestamptz,
               completed_at timestamptz, locked_by text, lease_expires_at timestamptz,
               cancel_requested_at timestamptz, error_message text, prompt text, prompt_length integer,
               options jsonb, attempts jsonb, idempotency_key text)
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
              else j.attempts end,
         j.idempotency_key
    from public.coding_jobs j where j.id = p_job_id
$$;

revoke all on function public.get_job(uuid) from public, anon, authenticated;
grant execute on function public.get_job(uuid) to service_role;

notify pgrst, 'reload schema';
