"""The worker's health: heartbeat files, the Falcon health app under gunicorn, metrics and the queue monitor.

Worker processes and the health server share state through files in the run folder (`RUN_DIR`): each worker
process writes `worker-<pid>.json` about once a second, and the health server reads them.
"""
