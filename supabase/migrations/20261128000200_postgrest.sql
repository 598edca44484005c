-- What the Supabase REST transport needs: a cheap readiness RPC, the lease rescue, a statement timeout that
-- PostgREST applies, and a Realtime Broadcast doorbell. Re-running this file is harmless.

-- queue_ping: the readiness check and the start-up schema check; one index-free statement.
create or replace function public.queue_ping() returns timestamptz
language sql stable set search_path = ''
as $$
  select now()
$$;

-- requeue_expired_leases: processing jobs whose lease expired (their worker died, or lost the HTTP reply of its
-- claim) go back to pending, counting a retry, or to failed when their retries are used up. Their old claim
-- token is cleared, so a late complete/retry from the lost holder is refused. Returns how many jobs moved.
create or replace function public.requeue_expired_leases(p_queue text default null, p_limit integer default 1000)
returns integer
language plpgsql volatile set search_path = ''
as $$
declare
  moved integer;
begin
  with expired as (
    select j.id
      from public.coding_jobs j
     where j.status = 'processing' and j.lease_expires_at < now()
       and (p_queue is null or j.queue_name = p_queue)
     order by j.lease_expires_at
     limit p_limit
       for update skip locked
  ), moved_jobs as (
    update public.coding_jobs j
       set status = case when j.retry_count < j.max_retries
                         then 'pending'::public.job_status else 'failed'::public.job_status end,
           retry_count = case when j.retry_count < j.max_retries then j.retry_count + 1 else j.retry_count end,
           error_message = format('lease expired at %s: worker %s stopped renewing it',
                                  j.lease_expires_at, coalesce(j.locked_by, 'unknown')),
           run_at = case when j.retry_count < j.max_retries then now() else j.run_at end,
           completed_at = case when j.retry_count < j.max_retries then null else now() end,
           locked_by = null, claim_token = null, lease_expires_at = null, started_at = null
      from expired e
     where j.id = e.id
    returning j.queue_name, j.run_at, j.status
  ), rung as (
    select public.coding_jobs_ring(queue_name, min(run_at))
      from moved_jobs where status = 'pending' group by queue_name
  )
  select (select count(*) from moved_jobs) into moved from (select count(*) from rung) r;
  return moved;
end
$$;

-- The Realtime doorbell: one small Broadcast per queue and statement on the private topic `coding_jobs`,
-- event `ring`, payload {"queue": <name>, "run_at": <epoch ms>} -- the same doorbell the pg_notify trigger rings,
-- never the row. realtime.send exists only on Supabase; it is looked up at run time, so plain PostgreSQL needs
-- nothing and a project that enables Realtime later starts ringing without a new migration. realtime.send
-- swallows its own errors, so a Realtime problem never fails an enqueue.
-- Security definer (search_path ''), so the inserting role (service_role) needs no grant on realtime.messages.
create or replace function public.coding_jobs_broadcast(p_queue text, p_run_at timestamptz) returns void
language plpgsql volatile security definer set search_path = ''
as $$
begin
  if to_regprocedure('realtime.send(jsonb, text, text, boolean)') is null then
    return;
  end if;
  execute 'select realtime.send($1, $2, $3, $4)'
    using jsonb_build_object('queue', p_queue, 'run_at', ceil(extract(epoch from p_run_at) * 1000)::bigint),
          'ring', 'coding_jobs', true;
end
$$;

-- One doorbell: every ring (inserts, retries, releases, reruns, rescues) also broadcasts.
create or replace function public.coding_jobs_ring(p_queue text, p_run_at timestamptz) returns void
language sql volatile set search_path = ''
as $$
  select pg_notify(
    'coding_jobs',
    json_build_object('queue', p_queue, 'run_at', ceil(extract(epoch from p_run_at) * 1000)::bigint)::text
  );
  select public.coding_jobs_broadcast(p_queue, p_run_at);
$$;

drop trigger if exists coding_jobs_broadcast_inserted on public.coding_jobs;
drop function if exists public.coding_jobs_broadcast_inserted();

revoke all on function
  public.queue_ping(),
  public.requeue_expired_leases(text, integer),
  public.coding_jobs_broadcast(text, timestamptz),
  public.coding_jobs_ring(text, timestamptz)
from public, anon, authenticated;

grant execute on function
  public.queue_ping(),
  public.requeue_expired_leases(text, integer),
  public.coding_jobs_broadcast(text, timestamptz)
to service_role;

-- A statement timeout for the queue's RPCs. A function's own `set statement_timeout` does not bound the
-- statement that calls it (PostgreSQL arms the timer when that statement starts; tried on PostgreSQL 15: a
-- function with `set statement_timeout = '200ms'` that sleeps 1 s returns after 1 s). What does bound it is
-- the role's setting: PostgREST (11.1 and later) applies `alter role ... set` of the role it impersonates at
-- the start of every request's transaction ("Impersonated Role Settings"). Supabase leaves service_role
-- unset, so its requests inherit the authenticator's 8 s; we make that 8 s explicit on service_role, and keep
-- any value an operator already chose. The setting is cluster-wide, like every role setting.
do $$
begin
  if exists (select from pg_catalog.pg_roles where rolname = 'service_role')
     and not exists (
       select from pg_catalog.pg_db_role_setting s
         join pg_catalog.pg_roles r on r.oid = s.setrole
        where r.rolname = 'service_role' and s.setdatabase = 0
          and exists (select from unnest(s.setconfig) c where c like 'statement_timeout=%'))
  then
    alter role service_role set statement_timeout = '8s';
  end if;
exception
  when insufficient_privilege then
    raise notice 'service_role keeps its statement timeout: this role may not alter it';
end
$$;

-- PostgREST caches the schema and the role settings: tell it to reload both (a no-op without PostgREST).
notify pgrst, 'reload config';
notify pgrst, 'reload schema';
