-- The operator's calls on fair share (issue 11), as the CLI and the dashboard make them over either transport.
-- Re-running this file is harmless.
--
-- * set_plan_limit: p_max_running may be left out (no cap). The operator calls leave out null arguments, over
--   the REST API as over direct PostgreSQL, so "no cap" has to be the default. A missing plan or priority is
--   refused with a message that says so, where it used to fail on a constraint of the table.
-- * delete_plan_limit: answers a row (plan, deleted) instead of a bare boolean, like every other operator
--   function, so that both transports read it the same way (two columns, so that the REST API answers
--   objects, never bare values). Nothing called it before this migration.

create or replace function public.set_plan_limit(
  p_plan text, p_priority integer, p_max_running integer default null
) returns setof public.queue_plan_limits
language plpgsql volatile set search_path = ''
as $$
begin
  if p_plan is null or p_plan = '' then
    raise exception 'set_plan_limit needs a plan name' using errcode = '22023';
  end if;
  if p_priority is null or p_priority not between 0 and 10 then
    raise exception 'a plan''s priority is 0 to 10, not %', coalesce(p_priority::text, 'null')
      using errcode = '22023';
  end if;
  if p_max_running < 0 then
    raise exception 'a cap is 0 or more running jobs (or null: no cap), not %', p_max_running
      using errcode = '22023';
  end if;
  delete from public.queue_plan_limits l where l.plan = p_plan and l.priority <> p_priority;
  return query
  insert into public.queue_plan_limits as l (priority, plan, max_running)
  values (p_priority, p_plan, p_max_running)
  on conflict (priority) do update
     set plan = excluded.plan, max_running = excluded.max_running, updated_at = now()
  returning l.*;
end
$$;

drop function if exists public.delete_plan_limit(text);

-- delete_plan_limit: forget a plan; its priorities fall under the next lower plan (or no cap).
create function public.delete_plan_limit(p_plan text) returns table (plan text, deleted boolean)
language plpgsql volatile set search_path = ''
as $$
begin
  delete from public.queue_plan_limits l where l.plan = p_plan;
  return query select p_plan, found;
end
$$;

revoke all on function
  public.set_plan_limit(text, integer, integer),
  public.delete_plan_limit(text)
from public, anon, authenticated;

grant execute on function
  public.set_plan_limit(text, integer, integer),
  public.delete_plan_limit(text)
to service_role;

notify pgrst, 'reload schema';
