-- Unique jobs (issue 11): an optional idempotency key. While a job with a key is pending or running, sending
-- another job with the same key gives back that job instead of a second one. Re-running this file is harmless.
--
-- The Edge Function keeps its plain INSERT through PostgREST and adds the key; to get the existing job back
-- instead of a 409 when the key is taken, it asks for PostgREST's upsert on the key:
--   POST /rest/v1/coding_jobs?on_conflict=idempotency_key
--   Prefer: resolution=merge-duplicates, return=representation
-- which PostgREST runs as INSERT ... ON CONFLICT ("idempotency_key") DO UPDATE SET <the posted columns> =
-- EXCLUDED.<...> RETURNING ... (docs.postgrest.org, "Upsert" and "On Conflict"). ON CONFLICT can only name a
-- unique index without a WHERE clause (PostgreSQL infers a partial index only from a matching predicate, and
-- PostgREST sends none: supabase/postgrest-js#403), so the key is unique over the whole table and a job lets go
-- of its key when it finishes (the trigger below). The upsert's UPDATE rewrites the posted columns with the same
-- values (a retried request); one that would change the job (the same key with another prompt, user, session,
-- project, queue or actor) is refused with 23505, which PostgREST answers 409.
-- Python producers set the key as a message option (`send_with_options(idempotency_key=...)`).

alter table public.coding_jobs add column if not exists idempotency_key text;

comment on column public.coding_jobs.idempotency_key is
  'Optional; unique among pending and running jobs. Cleared when the job finishes, so the key can be used again.';

do $$
begin
  alter table public.coding_jobs
    add constraint coding_jobs_idempotency_key_key unique (idempotency_key);
exception
  when duplicate_object or duplicate_table then null;
end
$$;

-- A finished job (completed, failed, cancelled, ...) lets go of its key. Named to run after the other BEFORE
-- UPDATE triggers (PostgreSQL runs them in name order), so it sees the status they settle on.
create or replace function public.coding_jobs_release_key() returns trigger
language plpgsql set search_path = ''
as $$
begin
  new.idempotency_key := null;
  return new;
end
$$;

drop trigger if exists coding_jobs_zz_release_key on public.coding_jobs;
create trigger coding_jobs_zz_release_key
  before update on public.coding_jobs
  for each row
  when (new.idempotency_key is not null and new.status not in ('pending', 'processing'))
  execute function public.coding_jobs_release_key();

-- An upsert that names a job by its key must not change what the job does.
create or replace function public.coding_jobs_keep_keyed_request() returns trigger
language plpgsql set search_path = ''
as $$
begin
  raise exception using
    errcode = 'unique_violation',
    message = format('idempotency key %s is taken by job %s, which was sent with other values',
                     left(old.idempotency_key, 200), old.id),
    hint = 'Repeat a request with the same values, or send a new job with a new key.';
end
$$;

drop trigger if exists coding_jobs_keep_keyed_request on public.coding_jobs;
create trigger coding_jobs_keep_keyed_request
  before update on public.coding_jobs
  for each row
  when (old.idempotency_key is not null and new.idempotency_key is not distinct from old.idempotency_key
        and (new.prompt, new.user_id, new.session_id, new.project_id, new.queue_name, new.actor_name)
            is distinct from
            (old.prompt, old.user_id, old.session_id, old.project_id, old.queue_name, old.actor_name))
  execute function public.coding_jobs_keep_keyed_request();

-- enqueue_jobs: as before, with the key (a message's `idempotency_key` option, moved into its column); a message
-- id seen before, or a key a pending or running job holds, is ignored.
create or replace function public.enqueue_jobs(p_jobs jsonb) returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  inserted integer;
begin
  insert into public.coding_jobs
         (id, queue_name, actor_name, args, kwargs, options, priority, max_retries, run_at, idempotency_key)
  select coalesce(j.id, gen_random_uuid()),
         coalesce(j.queue_name, 'default'),
         j.actor_name,
         coalesce(j.args, '[]'::jsonb),
         coalesce(j.kwargs, '{}'::jsonb),
         coalesce(j.options, '{}'::jsonb) - 'idempotency_key',
         coalesce(j.priority, 0),
         coalesce(j.max_retries, 3),
         now() + coalesce(j.delay_ms, 0) * interval '1 millisecond',
         coalesce(j.idempotency_key, j.options ->> 'idempotency_key')
    from jsonb_to_recordset(p_jobs) as j(
           id uuid, queue_name text, actor_name text, args jsonb, kwargs jsonb, options jsonb,
           priority integer, max_retries integer, delay_ms bigint, idempotency_key text)
  on conflict do nothing;
  get diagnostics inserted = row_count;
  return inserted;
end
$$;

-- enqueue_unique_job: enqueue one message (enqueue_jobs' shape) and return the id of the job that holds it: the
-- new row, the row of the same message id sent before, or the pending or running job that holds its key.
create or replace function public.enqueue_unique_job(p_job jsonb) returns uuid
language plpgsql volatile set search_path = ''
as $$
declare
  v_id uuid := (p_job ->> 'id')::uuid;
  v_key text := coalesce(p_job ->> 'idempotency_key', p_job -> 'options' ->> 'idempotency_key');
  v_found uuid;
begin
  if v_id is null then
    raise exception using errcode = 'invalid_parameter_value', message = 'enqueue_unique_job needs the job''s id';
  end if;
  -- The holder of the key can finish between the insert and the look-up; then the key is free again.
  for attempt in 1 .. 3 loop
    if public.enqueue_jobs(jsonb_build_array(p_job)) > 0 then
      return v_id;
    end if;
    select j.id into v_found from public.coding_jobs j where j.id = v_id;
    if v_found is null and v_key is not null then
      select j.id into v_found from public.coding_jobs j where j.idempotency_key = v_key;
    end if;
    if v_found is not null then
      return v_found;
    end if;
  end loop;
  raise exception 'job % was neither inserted nor found by its id or key', v_id;
end
$$;

revoke all on function
  public.coding_jobs_release_key(),
  public.coding_jobs_keep_keyed_request(),
  public.enqueue_unique_job(jsonb)
from public, anon, authenticated;

grant execute on function public.enqueue_unique_job(jsonb) to service_role;

notify pgrst, 'reload schema';
