"""The operator's live dashboard: server-rendered pages over the queue's operator functions.

Served by its own Falcon app on DASHBOARD_PORT (off unless set), from a fork of the worker's CLI or from
gunicorn beside it. Read-only without DASHBOARD_TOKEN; its actions (retry, cancel, pause, resume) need a
session signed in with that token. Everything it shows comes from the same SQL functions the CLI and /metrics
use, through the transport; its stylesheet, script and charts (inline SVG) ship in this package, so it works
on a private network.
"""
