-- A migration of ours changes nothing outside our own objects (issue 10, item 10). 20261128000200_postgrest.sql
-- gave service_role a cluster-wide statement_timeout of 8s: that also bounded the project's Edge Functions and
-- every other client using that role. The worker now bounds its own statements on its own connections (each
-- call runs `set local statement_timeout` in its own transaction, broker/function_pool.py). Undo the role
-- setting where it is still exactly the value that migration set; a value anyone else chose stays. Over REST,
-- requests keep the authenticator's statement timeout (8s on Supabase) and the transport's HTTP timeouts.
-- Re-running this file is harmless.
do $$
begin
  if exists (
    select from pg_catalog.pg_db_role_setting s
      join pg_catalog.pg_roles r on r.oid = s.setrole
     where r.rolname = 'service_role' and s.setdatabase = 0
       and 'statement_timeout=8s' = any (s.setconfig))
  then
    alter role service_role reset statement_timeout;
  end if;
exception
  when insufficient_privilege then
    raise notice 'service_role keeps statement_timeout = 8s: this role may not change it; '
      'run "alter role service_role reset statement_timeout" as a role that may';
end
$$;

-- PostgREST caches role settings: tell it to reload them (a no-op without PostgREST).
notify pgrst, 'reload config';
