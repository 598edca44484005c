-- A cheaper last statement for the fair claim (issue 11's throughput figure: a fair claim should keep >= 0.8x of
-- the plain one). The choice of jobs, the caps and aging stay those of 20261202000500_fairness.sql and
-- 20261202000530_fair_claim_speed.sql. Re-running this file is harmless.
--
-- The last statement counts the running jobs of the claim's users again under their locks. It did so with a
-- join of every running job against the candidates, which the generic plan (it guesses a handful of running
-- rows) ran as a nested loop: ~130 running rows x ~20 candidates compared, ~0.5 ms of a ~1.5 ms claim under a
-- 8-worker load. It now probes coding_jobs_running_user_idx once per candidate.
-- Tried and not kept (bench/README.md has the figures): reading each locked user's next pending jobs again
-- under the lock (claims lose fewer jobs to a claim that committed between their snapshot and their locks,
-- 12.6 -> 12.9 jobs per call, but it halved the claim rate of the one-job claims of bench.fairness's wait run);
-- a wider candidate window (96 rows per priority: 14.5 jobs per call, more CPU per job); fewer spare user locks.

-- -- Which jobs a claim takes ---------------------------------------------------------------------------------
-- As in 20261202000530, but for the last statement's count of running jobs (above).
create or replace function public.coding_jobs_claimable(p_queue text, p_limit integer)
returns table (id uuid, claim_order integer)
language plpgsql volatile set search_path = ''
rows 16
set plan_cache_mode = force_generic_plan
set jit = off
as $$
declare
  candidates_per_tier constant integer := greatest(p_limit * 3, 32);  -- CANDIDATES_PER_TIER
  fetch_rounds constant integer := 6;
  users_lock constant integer := 1364546386;  -- 'QUSR'
  jobs_lock constant integer := 1363824450;  -- 'QJOB'
  v_enabled boolean;
  v_caps integer[];
  v_step_ms double precision;
  v_run_users uuid[];
  v_run_counts bigint[];
  v_full uuid[];
  v_excluded uuid[];
  v_fixed public.coding_jobs_candidate[];
  v_top public.coding_jobs_candidate[];
  v_saturated uuid[];
  v_saturated_kept public.coding_jobs_candidate[];
  v_windows_full boolean;
  v_users bigint;
begin
  if p_limit is null or p_limit < 1 then
    return;
  end if;
  -- The settings and, with fair share on, every user's running jobs, in one statement: the candidates' slots
  -- below, and the users already running as many jobs as the cap of their running jobs' plan, who are left out
  -- of the candidates.
  select f.enabled, f.aging_step_ms, f.caps,
         coalesce(r.users, '{}'), coalesce(r.counts, '{}'), coalesce(r.full_users, '{}')
    into v_enabled, v_step_ms, v_caps, v_run_users, v_run_counts, v_full
    from (select f.enabled, f.aging_step_ms,
                 -- the cap of each priority 0..10, indexed by priority + 1
                 array(select (select l.max_running from public.queue_plan_limits l where l.priority <= p
                                order by l.priority desc limit 1)
                         from generate_series(0, 10) p order by p) as caps
            from public.queue_fairness f) f
    left join lateral (
      select array_agg(r.user_id) as users, array_agg(r.n) as counts,
             array_agg(r.user_id) filter (where r.n >= f.caps[r.priority + 1]) as full_users
        from (select j.user_id, count(*) as n, max(j.priority) as priority from public.coding_jobs j
               where f.enabled and j.status = 'processing' and j.user_id is not null group by j.user_id) r
    ) r on true;
  if not coalesce(v_enabled, false) then
    return query
    select j.id, (row_number() over (order by j.priority desc, j.created_at))::integer
      from (select j.id, j.priority, j.created_at from public.coding_jobs j
             where j.status = 'pending' and j.queue_name = p_queue and j.run_at <= now()
             order by j.priority desc, j.created_at
             limit p_limit
               for update skip locked) j;
    return;
  end if;

  v_excluded := v_full;
  v_fixed := '{}';
  -- Candidates: the oldest due jobs of each priority, in claim order, as far as their users' caps leave room
  -- (by the counts above). The users of the first ones are locked for this claim; a user whose lock another
  -- claim holds is left to that claim. When a user has more candidates than room, the next round fetches
  -- again without that user (keeping the jobs that fit), so that one user's backlog does not crowd out the
  -- others.
  for round in 1 .. fetch_rounds loop
    with fetched as (
      select c.id, c.user_id, c.priority, c.created_at, c.run_at, true as in_window
        from generate_series(0, 10) t(p)
        cross join lateral (
          select j.id, j.user_id, j.priority, j.created_at, j.run_at
            from public.coding_jobs j
           where j.status = 'pending' and j.queue_name = p_queue and j.priority = t.p and j.run_at <= now()
             and (j.user_id is null or j.user_id <> all(v_excluded))
           order by j.created_at
           limit candidates_per_tier) c
      union all
      select f.id, f.user_id, f.priority, f.created_at, f.run_at, false from unnest(v_fixed) f
    ), judged as (
      select c.*, coalesce(r.n, 0) as running, coalesce(r.n, 0) + row_number() over (
                    partition by c.user_id order by c.priority desc, c.created_at, c.id) as slot
        from fetched c
        left join unnest(v_run_users, v_run_counts) as r(user_id, n) on r.user_id = c.user_id
    ), kept as (
      select k.*,
             least(k.priority + floor(pg_catalog.date_part('epoch', now() - k.run_at) * 1000 / v_step_ms)::integer,
                   10) as tier
        from judged k
       where k.user_id is null or v_caps[k.priority + 1] is null or k.slot <= v_caps[k.priority + 1]
    ), top as (
      -- In claim order, lock each job's user as it comes (the lock is re-entrant), or the job itself when it
      -- has no user, and skip what another claim holds: claims running at once spread over the users and
      -- jobs instead of colliding on the same oldest ones. A few spare, in case a cap is found full below.
      select s.*
        from (select k.* from kept k order by k.tier desc, k.slot, k.created_at, k.id offset 0) s
       where case when s.user_id is null
                  then pg_catalog.pg_try_advisory_xact_lock(jobs_lock, pg_catalog.hashtext(s.id::text))
                  else pg_catalog.pg_try_advisory_xact_lock(users_lock, pg_catalog.hashtext(s.user_id::text))
             end
       limit p_limit + p_limit / 4 + 1
    ), saturated as (
      -- users with more candidates than this claim can take of theirs (their cap, or the whole claim)
      select distinct j.user_id from judged j
       where j.user_id is not null
         and (j.slot > v_caps[j.priority + 1] or j.slot - j.running > p_limit)
    )
    select (select coalesce(array_agg(row(t.id, t.user_id, t.priority, t.created_at, t.run_at)
                                        ::public.coding_jobs_candidate
                                      order by t.tier desc, t.slot, t.created_at, t.id), '{}') from top t),
           (select coalesce(array_agg(s.user_id), '{}') from saturated s),
           (select coalesce(array_agg(row(k.id, k.user_id, k.priority, k.created_at, k.run_at)
                                        ::public.coding_jobs_candidate), '{}')
              from kept k where k.user_id in (select s.user_id from saturated s)),
           exists (select from fetched f where f.in_window group by f.priority
                    having count(*) >= candidates_per_tier),
           (select count(distinct k.user_id) + count(*) filter (where k.user_id is null) from kept k)
      into v_top, v_saturated, v_saturated_kept, v_windows_full, v_users;
    -- Enough users to fill the claim (a user not fetched has only jobs younger than theirs), nobody left out,
    -- or nothing more to fetch.
    exit when v_users >= p_limit or cardinality(v_saturated) = 0 or not v_windows_full or round = fetch_rounds;
    v_fixed := v_saturated_kept;
    v_excluded := v_excluded || v_saturated;
  end loop;

  -- A new statement, so a new snapshot: it sees every claim of the locked users (the users of v_top) that
  -- committed before their locks were ours, and no other claim of theirs can commit until this transaction
  -- does. Their caps are checked again with these counts: one probe of the running index per candidate.
  return query
  with candidates as (
    select t.id, t.user_id, t.priority, t.ord
      from unnest(v_top) with ordinality as t(id, user_id, priority, created_at, run_at, ord)
  ), ranked as (
    select c.id, c.user_id, c.priority, c.ord,
           r.n + row_number() over (partition by c.user_id order by c.ord) as slot
      from candidates c
      cross join lateral (select count(*) as n from public.coding_jobs j
                           where c.user_id is not null and j.status = 'processing' and j.user_id = c.user_id) r
  )
  select k.id, k.ord::integer
    from ranked k
    join public.coding_jobs j on j.id = k.id
   where (k.user_id is null or v_caps[k.priority + 1] is null or k.slot <= v_caps[k.priority + 1])
     and j.status = 'pending' and j.run_at <= now()
   order by k.ord
   limit p_limit
     for update of j skip locked;
end
$$;

notify pgrst, 'reload schema';
