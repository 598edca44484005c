-- A job the service or its user cancelled: a terminal status beside completed and failed.
-- On its own because PostgreSQL lets a new enum value be used only after the transaction that added it
-- commits; the operator's migrations after it use it. Re-running this file is harmless.
alter type public.job_status add value if not exists 'cancelled';
