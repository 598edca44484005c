"""The operator's command line (`supabase-queue-worker`): stats, jobs, retries, cancels, pauses, pruning.

It reads and changes the queue only through the queue's operator functions, over the transport the settings
select, like the dashboard and /metrics.
"""
