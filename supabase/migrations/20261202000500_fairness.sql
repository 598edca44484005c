-- Fair share for a SaaS queue (issue 11): per-user concurrency caps by plan, round-robin between users inside a
-- plan tier, and aging, so that no pending job waits forever. Re-running this file is harmless.
--
-- Which pending jobs a claim takes is decided by one function, coding_jobs_claimable(); claim_jobs only calls it.
--
-- How a cap stays exact when many workers claim at once:
-- * A job's user may have at most max_running jobs running (status 'processing', in any queue), where
--   max_running is the cap of the plan the job's priority names (queue_plan_limits). Jobs without a user_id
--   are not capped.
-- * A claim decides for a user only while it holds that user's advisory transaction lock (namespace 'QUSR',
--   key hashtext(user_id)), taken with pg_try_advisory_xact_lock: a claim never waits for another; it leaves
--   a user whose lock is taken to the claim that holds it. The lock is released when the claim commits.
-- * Under the lock, a later statement (so a snapshot taken after the lock, which sees every claim of that
--   user committed before it) counts the user's running jobs from the coding_jobs_running_user_idx index.
--   No other claim can start a job of that user until this one commits, so count + taken <= cap holds.
-- * Nothing else adds running jobs (every claim path goes through coding_jobs_claimable, except the seed's
--   claim_next_job(), which ignores caps). Settling, rescuing and cancelling only lower the count, so no
--   counter needs keeping: the settle paths are untouched. A statement trigger rings the doorbell when a job
--   of a user with due pending jobs stops running, so capped jobs start as soon as a slot frees.
--
-- The order of a claim (coding_jobs_claimable), within one queue:
-- 1. Effective tier, highest first: the plan tier (priority 0..10) plus one step per aging_step_ms that the
--    job has been due (run_at), up to the top tier (10). A Free job due for 10 steps ranks with Pro jobs.
-- 2. Inside a tier, the job's slot: how many of its user's jobs would be running once it starts (the user's
--    running jobs plus its rank among the user's candidates). Users with fewer jobs running go first: a user
--    with 200 pending jobs and a user with 1 both start in the same claim. Jobs without a user share a slot
--    count of their own.
-- 3. Then the oldest first.
-- Candidates are the oldest due jobs of each priority (CANDIDATES_PER_TIER), fetched again without the users
-- whose cap those already fill, so that one user's backlog never hides the others'.

-- -- Settings ----------------------------------------------------------------------------------------------
create table if not exists public.queue_plan_limits (
  -- the lowest priority of the plan: a job of priority p gets the cap of the plan with the highest priority <= p
  priority integer primary key check (priority between 0 and 10),
  plan text not null unique check (plan <> ''),
  -- running jobs per user; null: no cap
  max_running integer check (max_running is null or max_running >= 0),
  updated_at timestamptz not null default now()
);

comment on table public.queue_plan_limits is
  'Per-user concurrency caps by plan tier (a job''s priority). Edit through set_plan_limit().';

insert into public.queue_plan_limits (priority, plan, max_running)
values (0, 'free', 1), (5, 'starter', 2), (10, 'pro', 5)
on conflict do nothing;

create table if not exists public.queue_fairness (
  singleton boolean primary key default true check (singleton),
  -- false: claims take the highest priority, then the oldest, with no caps (the order before this migration)
  enabled boolean not null default true,
  -- milliseconds of waiting (since run_at) that raise a pending job's effective priority by one step
  aging_step_ms integer not null default 30000 check (aging_step_ms > 0),
  updated_at timestamptz not null default now()
);

comment on table public.queue_fairness is 'Fair share switch and aging; one row. Edit through set_fairness().';

insert into public.queue_fairness default values on conflict do nothing;

-- A user's running jobs (caps), and their due pending jobs (the doorbell when a slot frees, statistics).
create index if not exists coding_jobs_running_user_idx
  on public.coding_jobs (user_id) where status = 'processing';
create index if not exists coding_jobs_pending_user_idx
  on public.coding_jobs (user_id) where status = 'pending';

-- A candidate job of a claim.
do $$
begin
  create type public.coding_jobs_candidate as (
    id uuid, user_id uuid, priority integer, created_at timestamptz, run_at timestamptz
  );
exception
  when duplicate_object then null;
end
$$;

-- -- Which jobs a claim takes ---------------------------------------------------------------------------------
-- coding_jobs_claimable: up to p_limit due pending jobs of p_queue, locked (FOR UPDATE) by this transaction and
-- returned in the order to start them. It takes the caps' user locks too: call it inside the transaction that
-- claims the jobs, and claim them in that same transaction (claim_jobs does).
create or replace function public.coding_jobs_claimable(p_queue text, p_limit integer)
returns table (id uuid, claim_order integer)
language plpgsql volatile set search_path = ''
-- A claim's size, for the planner: with its default guess (1000 rows) claim_jobs joined the ids to the table
-- by scanning all of it.
rows 16
-- Plans kept from the first call: planning these statements anew on every claim cost more than running them.
set plan_cache_mode = force_generic_plan
-- Short statements over a few rows, whose estimates grow with the table: JIT compiling them would cost ~0.5 s.
set jit = off
as $$
declare
  candidates_per_tier constant integer := greatest(p_limit * 3, 32);  -- CANDIDATES_PER_TIER
  fetch_rounds constant integer := 6;
  users_lock constant integer := 1364546386;  -- 'QUSR'
  jobs_lock constant integer := 1363824450;  -- 'QJOB'
  v_fair record;
  v_caps integer[];
  v_step_ms double precision;
  v_fixed public.coding_jobs_candidate[] := '{}';
  v_kept public.coding_jobs_candidate[];
  v_top public.coding_jobs_candidate[];
  v_locked uuid[];
  v_full uuid[] := '{}';
  v_saturated uuid[];
  v_windows_full boolean;
  v_users bigint;
begin
  if p_limit is null or p_limit < 1 then
    return;
  end if;
  select f.enabled, f.aging_step_ms,
         -- the cap of each priority 0..10, indexed by priority + 1
         array(select (select l.max_running from public.queue_plan_limits l where l.priority <= p
                        order by l.priority desc limit 1)
                 from generate_series(0, 10) p order by p) as caps
    into v_fair
    from public.queue_fairness f;
  if not coalesce(v_fair.enabled, false) then
    return query
    select j.id, (row_number() over (order by j.priority desc, j.created_at))::integer
      from (select j.id, j.priority, j.created_at from public.coding_jobs j
             where j.status = 'pending' and j.queue_name = p_queue and j.run_at <= now()
             order by j.priority desc, j.created_at
             limit p_limit
               for update skip locked) j;
    return;
  end if;
  v_caps := v_fair.caps;
  v_step_ms := v_fair.aging_step_ms;

  -- Users already running as many jobs as the cap of their running jobs' plan: left out of the candidates.
  select coalesce(array_agg(r.user_id), '{}') into v_full
    from (select j.user_id, count(*) as n, max(j.priority) as priority from public.coding_jobs j
           where j.status = 'processing' and j.user_id is not null group by j.user_id) r
   where r.n >= v_caps[r.priority + 1];

  -- Candidates: the oldest due jobs of each priority, in claim order, as far as their users' caps leave room
  -- (by the counts above). The users of the first ones are locked for this claim; a user whose lock another
  -- claim holds is left to that claim. When a user has more candidates than room, the next round fetches again
  -- without that user (keeping the jobs that fit), so that one user's backlog does not crowd out the others.
  for round in 1 .. fetch_rounds loop
    with fetched as (
      select c.id, c.user_id, c.priority, c.created_at, c.run_at, count(*) over (partition by t.p) as in_window
        from generate_series(0, 10) t(p)
        cross join lateral (
          select j.id, j.user_id, j.priority, j.created_at, j.run_at
            from public.coding_jobs j
           where j.status = 'pending' and j.queue_name = p_queue and j.priority = t.p and j.run_at <= now()
             and (j.user_id is null or j.user_id <> all(v_full))
           order by j.created_at
           limit candidates_per_tier) c
      union all
      select f.id, f.user_id, f.priority, f.created_at, f.run_at, 0 from unnest(v_fixed) f
    ), running as (
      -- the fetched users' running jobs (again under their locks before anything is claimed)
      select j.user_id, count(*) as n from public.coding_jobs j
       where j.status = 'processing' and j.user_id in (select f.user_id from fetched f) group by j.user_id
    ), judged as (
      select c.*, coalesce(r.n, 0) as running, coalesce(r.n, 0) + row_number() over (
                    partition by c.user_id order by c.priority desc, c.created_at, c.id) as slot
        from fetched c
        left join running r on r.user_id = c.user_id
    ), kept as (
      select k.*, least(k.priority + floor(extract(epoch from now() - k.run_at) * 1000 / v_step_ms), 10) as tier
        from judged k
       where k.user_id is null or v_caps[k.priority + 1] is null or k.slot <= v_caps[k.priority + 1]
    ), top as (
      -- In claim order, lock each job's user as it comes (the lock is re-entrant), or the job itself when it has
      -- no user, and skip what another claim holds: claims running at once spread over the users and jobs
      -- instead of colliding on the same oldest ones. A few spare, in case a cap is found full below.
      select s.*
        from (select k.* from kept k order by k.tier desc, k.slot, k.created_at, k.id offset 0) s
       where case when s.user_id is null
                  then pg_catalog.pg_try_advisory_xact_lock(jobs_lock, pg_catalog.hashtext(s.id::text))
                  else pg_catalog.pg_try_advisory_xact_lock(users_lock, pg_catalog.hashtext(s.user_id::text))
             end
       limit p_limit + p_limit / 4 + 1
    ), locked as (
      select distinct t.user_id from top t where t.user_id is not null
    )
    select (select coalesce(array_agg(row(k.id, k.user_id, k.priority, k.created_at, k.run_at)
                                        ::public.coding_jobs_candidate), '{}') from kept k),
           (select coalesce(array_agg(row(t.id, t.user_id, t.priority, t.created_at, t.run_at)
                                        ::public.coding_jobs_candidate
                                      order by t.tier desc, t.slot, t.created_at, t.id), '{}') from top t),
           (select coalesce(array_agg(l.user_id), '{}') from locked l),
           -- users with more candidates than this claim can take of theirs (their cap, or the whole claim)
           (select coalesce(array_agg(distinct j.user_id), '{}') from judged j
             where j.user_id is not null
               and (j.slot > v_caps[j.priority + 1] or j.slot - j.running > p_limit)),
           (select coalesce(bool_or(f.in_window >= candidates_per_tier), false) from fetched f),
           (select count(distinct k.user_id) + count(*) filter (where k.user_id is null) from kept k)
      into v_kept, v_top, v_locked, v_saturated, v_windows_full, v_users;
    -- Enough users to fill the claim (a user not fetched has only jobs younger than theirs), nobody left out,
    -- or nothing more to fetch.
    exit when v_users >= p_limit or cardinality(v_saturated) = 0 or not v_windows_full or round = fetch_rounds;
    v_fixed := array(select row(c.id, c.user_id, c.priority, c.created_at, c.run_at)::public.coding_jobs_candidate
                       from unnest(v_kept) c where c.user_id = any(v_saturated));
    v_full := v_full || v_saturated;
  end loop;

  -- A new statement, so a new snapshot: it sees every claim of the locked users that committed before their
  -- locks were ours, and no other claim of theirs can commit until this transaction does. Their caps are
  -- checked again with these counts.
  return query
  with running as (
    select j.user_id, count(*) as n from public.coding_jobs j
     where j.status = 'processing' and j.user_id = any(v_locked) group by j.user_id
  ), ranked as (
    select t.id, t.user_id, t.priority, t.ord,
           coalesce(r.n, 0) + row_number() over (partition by t.user_id order by t.ord) as slot
      from unnest(v_top) with ordinality as t(id, user_id, priority, created_at, run_at, ord)
      left join running r on r.user_id = t.user_id
     where t.user_id is null or t.user_id = any(v_locked)
  )
  select j.id, k.ord::integer
    from ranked k
    join public.coding_jobs j on j.id = k.id
   where (k.user_id is null or v_caps[k.priority + 1] is null or k.slot <= v_caps[k.priority + 1])
     and j.status = 'pending' and j.run_at <= now()
   order by k.ord
   limit p_limit
     for update of j skip locked;
end
$$;

-- -- Claims ----------------------------------------------------------------------------------------------------
-- claim_jobs: as in the lifecycle migration (idempotent by the caller's token, registered workers only), with the
-- choice of jobs made by coding_jobs_claimable; the jobs come back in its order.
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
  -- A paused queue (the operator's pause_queue) and an unregistered or lost worker claim nothing.
  if exists (select from public.queue_pauses p where p.queue_name = p_queue)
     or not exists (
       select from public.queue_workers w where w.worker_id = p_worker_id and w.lost_at is null) then
    return;
  end if;
  return query
  with next_jobs as (
    select c.id, c.claim_order from public.coding_jobs_claimable(p_queue, p_limit) c
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
  select c.* from claimed c join next_jobs n on n.id = c.id order by n.claim_order;
end
$$;

-- The earlier claim_jobs, for workers of the previous version during a rolling deploy: the same choice of jobs,
-- so the caps hold while old and new workers claim side by side.
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
    select c.id, c.claim_order from public.coding_jobs_claimable(p_queue, p_limit) c
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
    from claimed c join next_jobs n on n.id = c.id order by n.claim_order;
end
$$;

-- -- A slot frees: wake the consumers --------------------------------------------------------------------------
-- When a job stops running (completed, retried, dead-lettered, released, postponed, rescued, cancelled: whichever
-- function did it) and its user was at the cap, ring the queues where that user has due pending jobs: they
-- waited for this slot. One ring per queue and statement, and none while nobody was capped: a NOTIFY
-- serialises the commits of every transaction that sends one, so settles must not ring for nothing.
create or replace function public.coding_jobs_ring_freed_slots() returns trigger
language plpgsql set search_path = ''
as $$
begin
  perform public.coding_jobs_ring(q.queue_name, now())
     from (select distinct p.queue_name
             from (select o.user_id, count(*) as n, max(o.priority) as priority
                     from old_rows o join new_rows n on n.id = o.id
                    where o.status = 'processing' and n.status <> 'processing' and o.user_id is not null
                    group by o.user_id) f
             join public.coding_jobs p on p.user_id = f.user_id and p.status = 'pending' and p.run_at <= now()
            where exists (select from public.queue_fairness s where s.enabled)
              and f.n + (select count(*) from public.coding_jobs r
                          where r.status = 'processing' and r.user_id = f.user_id)
                  >= (select l.max_running from public.queue_plan_limits l where l.priority <= f.priority
                       order by l.priority desc limit 1)) q;
  return null;
end
$$;

drop trigger if exists coding_jobs_ring_freed_slots on public.coding_jobs;
create trigger coding_jobs_ring_freed_slots
  after update on public.coding_jobs
  referencing old table as old_rows new table as new_rows
  for each statement execute function public.coding_jobs_ring_freed_slots();

-- -- What the operator sees and edits --------------------------------------------------------------------------
-- get_plan_limits: the plans, their caps and the priorities each covers.
create or replace function public.get_plan_limits()
returns table (plan text, priority integer, max_priority integer, max_running integer, updated_at timestamptz)
language sql stable set search_path = ''
as $$
  select l.plan, l.priority,
         coalesce(lead(l.priority) over (order by l.priority) - 1, 10),
         l.max_running, l.updated_at
    from public.queue_plan_limits l
   order by l.priority
$$;

-- set_plan_limit: add a plan or change its tier or cap (p_max_running null: no cap). Takes effect at the next
-- claim; jobs already running are never stopped by a lower cap.
create or replace function public.set_plan_limit(p_plan text, p_priority integer, p_max_running integer)
returns setof public.queue_plan_limits
language plpgsql volatile set search_path = ''
as $$
begin
  delete from public.queue_plan_limits l where l.plan = p_plan and l.priority <> p_priority;
  return query
  insert into public.queue_plan_limits as l (priority, plan, max_running)
  values (p_priority, p_plan, p_max_running)
  on conflict (priority) do update
     set plan = excluded.plan, max_running = excluded.max_running, updated_at = now()
  returning l.*;
end
$$;

-- delete_plan_limit: forget a plan; its priorities fall under the next lower plan (or no cap).
create or replace function public.delete_plan_limit(p_plan text) returns boolean
language plpgsql volatile set search_path = ''
as $$
begin
  delete from public.queue_plan_limits l where l.plan = p_plan;
  return found;
end
$$;

-- get_fairness / set_fairness: the switch and the aging step (null leaves a setting as it is).
create or replace function public.get_fairness()
returns table (enabled boolean, aging_step_ms integer, top_tier_after_ms bigint, updated_at timestamptz)
language sql stable set search_path = ''
as $$
  select f.enabled, f.aging_step_ms, 10::bigint * f.aging_step_ms, f.updated_at from public.queue_fairness f
$$;

create or replace function public.set_fairness(p_enabled boolean default null, p_aging_step_ms integer default null)
returns table (enabled boolean, aging_step_ms integer, top_tier_after_ms bigint, updated_at timestamptz)
language plpgsql volatile set search_path = ''
as $$
begin
  insert into public.queue_fairness as f (enabled, aging_step_ms)
  values (coalesce(p_enabled, true), coalesce(p_aging_step_ms, 30000))
  on conflict (singleton) do update
     set enabled = coalesce(p_enabled, f.enabled),
         aging_step_ms = coalesce(p_aging_step_ms, f.aging_step_ms),
         updated_at = now();
  return query select * from public.get_fairness();
end
$$;

-- get_fairness_stats: per plan, its cap, the jobs and users running, the users at their cap, the due jobs
-- waiting because their user is at the cap, and the oldest due pending job (over every queue).
create or replace function public.get_fairness_stats()
returns table (plan text, priority integer, max_running integer, running_jobs bigint, running_users bigint,
               users_at_cap bigint, capped_pending_jobs bigint, oldest_pending_at timestamptz)
language sql stable set search_path = ''
-- Index probes over a few rows, estimated high on a big table: JIT compiling them took ~0.6 s per call.
set jit = off
as $$
  with plans as (
    select l.plan, l.priority, coalesce(lead(l.priority) over (order by l.priority) - 1, 10) as top,
           l.max_running
      from public.queue_plan_limits l
  ), running as (
    select j.user_id, max(j.priority) as priority, count(*) as n
      from public.coding_jobs j
     where j.status = 'processing' and j.user_id is not null
     group by j.user_id
  ), at_cap as (
    select r.user_id, p.plan
      from running r join plans p on r.priority between p.priority and p.top
     where p.max_running is not null and r.n >= p.max_running
  )
  select p.plan, p.priority, p.max_running,
         coalesce((select sum(r.n) from running r where r.priority between p.priority and p.top), 0)::bigint,
         (select count(*) from running r where r.priority between p.priority and p.top),
         (select count(*) from at_cap a where a.plan = p.plan),
         (select count(*) from at_cap a
            join public.coding_jobs j on j.user_id = a.user_id and j.status = 'pending' and j.run_at <= now()
           where a.plan = p.plan),
         (select min(o.created_at)
            from generate_series(p.priority, p.top) t(pr)
            cross join lateral (
              select j.created_at from public.coding_jobs j
               where j.status = 'pending' and j.priority = t.pr and j.run_at <= now()
               order by j.priority desc, j.created_at limit 1) o)
    from plans p
   order by p.priority
$$;

-- -- Grants ----------------------------------------------------------------------------------------------------
alter table public.queue_plan_limits enable row level security;
alter table public.queue_fairness enable row level security;
revoke all on table public.queue_plan_limits, public.queue_fairness from public, anon, authenticated;
grant select, insert, update, delete on table public.queue_plan_limits, public.queue_fairness to service_role;

revoke all on function
  public.coding_jobs_claimable(text, integer),
  public.coding_jobs_ring_freed_slots(),
  public.get_plan_limits(),
  public.set_plan_limit(text, integer, integer),
  public.delete_plan_limit(text),
  public.get_fairness(),
  public.set_fairness(boolean, integer),
  public.get_fairness_stats()
from public, anon, authenticated;

grant execute on function
  public.coding_jobs_claimable(text, integer),
  public.get_plan_limits(),
  public.set_plan_limit(text, integer, integer),
  public.delete_plan_limit(text),
  public.get_fairness(),
  public.set_fairness(boolean, integer),
  public.get_fairness_stats()
to service_role;

notify pgrst, 'reload schema';
