"""The dashboard's pages as HTML: every value escaped, prompts and errors as short excerpts, no secret shown.

Links are relative (`root` is "" on the main page and "../" one level down), so the pages work behind a
reverse proxy that serves them under any path prefix.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime
from html import escape

from broker.operator_records import (
    TOP_PRIORITY,
    FairnessSettings,
    JobDetail,
    JobSummary,
    PlanShare,
    WorkerRecord,
)
from health.dashboard.board import Board, QueueRow, age_s
from health.dashboard.charts import STATUS_CLASSES, bar_chart, line_chart
from health.monitor import STATUSES
from service.logs import redact

#: Characters of a prompt shown in a list; of an error in a list; of an error on a job's page.
PROMPT_CHARS, ERROR_CHARS, FULL_ERROR_CHARS = 80, 160, 4000
#: Milliseconds between refreshes of the main page's live part.
REFRESH_MS = 5_000


@dataclasses.dataclass(frozen=True, slots=True)
class Viewer:
    """Who looks: whether actions exist at all, and whether this session may take them."""

    actions_enabled: bool
    signed_in: bool
    #: The CSRF value the forms carry; only a signed-in session gets it.
    csrf: str | None


def e(value: object) -> str:
    return "" if value is None else escape(str(value), quote=True)


def excerpt(text: str | None, chars: int) -> str:
    """The start of a text, one line, redacted like the logs, with an ellipsis when cut."""
    if not text:
        return ""
    line = " ".join(redact(text).split())
    return line if len(line) <= chars else line[: chars - 1] + "\u2026"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def stamp(moment: datetime | None) -> str:
    if moment is None:
        return ""
    return f'<time datetime="{moment.isoformat()}">{moment:%Y-%m-%d %H:%M:%S}</time>'


# -- the page around everything ----------------------------------------------------------------------------
def layout(title: str, body: str, *, root: str, viewer: Viewer) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<link rel="stylesheet" href="{root}static/dashboard.css">
<script src="{root}static/dashboard.js" defer></script>
</head>
<body>
<header>
<h1><a href="{root or "./"}">Queue</a></h1>
{_session(root, viewer)}
</header>
{body}
</body>
</html>
"""


def _session(root: str, viewer: Viewer) -> str:
    if not viewer.actions_enabled:
        return '<p class="session">Read-only: set DASHBOARD_TOKEN to allow actions.</p>'
    if viewer.signed_in:
        return (
            f'<form class="session" method="post" action="{root}logout">'
            '<span id="signed-in">Signed in</span> <button type="submit">Sign out</button></form>'
        )
    return (
        f'<form class="session" method="post" action="{root}login">'
        '<label>Dashboard token <input type="password" name="token" autocomplete="current-password" '
        'required></label> <button type="submit" id="sign-in">Sign in</button></form>'
    )


def action(root: str, viewer: Viewer, name: str, label: str, *, back: str = "", **fields: str) -> str:
    """A button that posts one action; refused by the server unless the session may act."""
    hidden = "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in fields.items())
    if viewer.csrf is not None:
        hidden += f'<input type="hidden" name="csrf" value="{e(viewer.csrf)}">'
    return (
        f'<form class="inline" method="post" action="{root}actions/{e(name)}">{hidden}'
        f'<input type="hidden" name="back" value="{e(back)}">'
        f'<button type="submit" class="{e(name)}" data-action="{e(name)}">{e(label)}</button></form>'
    )


def status_badge(status: str) -> str:
    return f'<span class="badge {STATUS_CLASSES.get(status, "")}">{e(status)}</span>'


def job_link(root: str, job_id: str) -> str:
    return f'<a class="job" href="{root}jobs/{e(job_id)}" title="{e(job_id)}">{e(job_id[:8])}</a>'


# -- the main page -----------------------------------------------------------------------------------------
def home_page(board: Board, viewer: Viewer, refresh_ms: int = REFRESH_MS) -> str:
    body = f'<main id="live" data-src="live" data-refresh-ms="{refresh_ms}">{live_part(board, viewer)}</main>'
    return layout("Queue", body, root="", viewer=viewer)


def live_part(board: Board, viewer: Viewer) -> str:
    """The part of the main page its script refreshes."""
    return "\n".join(
        [
            f'<p class="updated">Updated {stamp(board.now)} UTC</p>',
            _alerts(board),
            _queues(board.queues, viewer),
            _plans(board.plans, board.fairness, board),
            '<section class="charts"><figure>'
            + line_chart("Queue depth by status, last hour", board.depth)
            + "<figcaption>Queue depth, last hour</figcaption></figure><figure>"
            + bar_chart("Jobs finished per minute, last hour", board.throughput)
            + "<figcaption>Throughput per minute, last hour</figcaption></figure></section>",
            _jobs("Running", "running", board.running, board, viewer),
            _jobs("Pending", "pending", board.pending, board, viewer),
            _jobs("Failed", "failed", board.failed, board, viewer),
            _jobs("Cancelled", "cancelled", board.cancelled, board, viewer),
            _workers(board.workers, board),
        ]
    )


def _alerts(board: Board) -> str:
    items = []
    for queue in board.queues:
        if queue.unconsumed:
            items.append(
                f"Queue <b>{e(queue.name)}</b> has {queue.counts.get('pending', 0)} pending job(s) and no "
                "worker consumes it."
            )
        if queue.paused is not None:
            items.append(f"Queue <b>{e(queue.name)}</b> is paused ({e(queue.paused.reason or 'no reason')}).")
    if not items:
        return '<section class="alerts ok"><p>No alerts.</p></section>'
    return '<section class="alerts"><ul>' + "".join(f"<li>{item}</li>" for item in items) + "</ul></section>"


def _queues(queues: tuple[QueueRow, ...], viewer: Viewer) -> str:
    head = "".join(f"<th>{e(status)}</th>" for status in STATUSES)
    rows = []
    for queue in queues:
        cells = "".join(f'<td class="num">{queue.counts.get(status, 0):,}</td>' for status in STATUSES)
        if queue.paused is not None:
            state = '<span class="badge paused">paused</span> '
            toggle = action("", viewer, "resume", "Resume", queue=queue.name)
        else:
            state = ""
            toggle = action("", viewer, "pause", "Pause", queue=queue.name)
        rows.append(
            f'<tr data-queue="{e(queue.name)}"><th scope="row">{state}{e(queue.name)}</th>{cells}'
            f'<td class="num">{duration(queue.oldest_wait_s)}</td><td class="num">{queue.consumers}</td>'
            f"<td>{toggle}</td></tr>"
        )
    body = "".join(rows) or f'<tr><td colspan="{len(STATUSES) + 4}">No queues yet.</td></tr>'
    return (
        '<section><h2>Queues</h2><table class="queues"><thead><tr><th>Queue</th>'
        f"{head}<th>Oldest wait</th><th>Workers</th><th></th></tr></thead>"
        f"<tbody>{body}</tbody></table></section>"
    )


def _plans(plans: tuple[PlanShare, ...], fairness: FairnessSettings, board: Board) -> str:
    """Fair share, read-only: the CLI's `plans` and `fairness` change it."""
    rows = []
    for plan in plans:
        tier = (
            str(plan.priority)
            if plan.priority == plan.max_priority
            else f"{plan.priority}&ndash;{plan.max_priority}"
        )
        cap = "no cap" if plan.max_running is None else f"{plan.max_running}"
        waiting = "" if plan.oldest_pending_at is None else duration(age_s(plan.oldest_pending_at, board.now))
        counts = (plan.running_jobs, plan.running_users, plan.users_at_cap, plan.capped_pending_jobs)
        cells = "".join(f'<td class="num">{count:,}</td>' for count in counts)
        rows.append(
            f'<tr data-plan="{e(plan.plan)}"><th scope="row">{e(plan.plan)}</th><td class="num">{tier}</td>'
            f'<td class="num">{cap}</td>{cells}<td class="num">{waiting}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="8" class="none">No plan: no job is capped.</td></tr>'
    step = _milliseconds(fairness.aging_step_ms)
    if fairness.enabled:
        setting = (
            f"Fair share is <b>on</b>; aging step {step}: a pending job reaches the top tier after "
            f"{TOP_PRIORITY} &times; aging step ({_milliseconds(fairness.top_tier_after_ms)})."
        )
    else:
        setting = (
            "Fair share is <b>off</b>: claims take the highest priority, then the oldest, with no caps "
            f"(aging step when on: {step})."
        )
    return (
        '<section id="plans"><h2>Plans / fair share</h2>'
        f'<p class="fairness" data-enabled="{str(fairness.enabled).lower()}">{setting}</p>'
        '<table class="plans"><thead><tr><th>Plan</th><th>Priorities</th><th>Cap per user</th>'
        "<th>Running jobs</th><th>Running users</th><th>Users at cap</th><th>Capped pending</th>"
        f"<th>Oldest wait</th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def _milliseconds(milliseconds: int) -> str:
    return f"{milliseconds:,} ms" if milliseconds % 1000 else duration(milliseconds // 1000)


def _jobs(title: str, kind: str, jobs: tuple[JobSummary, ...], board: Board, viewer: Viewer) -> str:
    now = board.now
    columns = {
        "running": ("Worker", "Running for", "Lease ends in"),
        "pending": ("Priority", "Waiting", "Due in"),
    }.get(kind, ("Finished", "Attempts", "Error"))
    head = "".join(f"<th>{name}</th>" for name in ("Job", "Queue", "Actor", *columns))
    rows = []
    for job in jobs:
        if kind == "running":
            lease_left = age_s(now, job.lease_expires_at) if job.lease_expires_at else None
            note = ' <span class="badge cancelling">cancelling</span>' if job.cancel_requested_at else ""
            cells = (
                f"<td>{e(job.locked_by)}{note}</td><td>{duration(age_s(job.started_at, now))}</td>"
                f"<td>{duration(lease_left)}</td>"
            )
            button = action("", viewer, "cancel", "Cancel", job_id=job.id)
        elif kind == "pending":
            due_in = None if job.run_at is None else max((job.run_at - now).total_seconds(), 0)
            cells = (
                f'<td class="num">{job.priority}</td><td>{duration(age_s(job.created_at, now))}</td>'
                f"<td>{duration(due_in) if due_in else 'now'}</td>"
            )
            button = action("", viewer, "cancel", "Cancel", job_id=job.id)
        else:
            cells = (
                f'<td>{duration(age_s(job.completed_at, now))} ago</td><td class="num">{job.attempts}</td>'
                f'<td class="error">{e(excerpt(job.error, ERROR_CHARS))}</td>'
            )
            button = action("", viewer, "retry", "Retry", job_id=job.id)
        prompt = e(excerpt(job.prompt, PROMPT_CHARS))
        rows.append(
            f'<tr data-job="{e(job.id)}"><td>{job_link("", job.id)}</td><td>{e(job.queue_name)}</td>'
            f'<td>{e(job.actor_name)}</td>{cells}<td class="prompt">{prompt}</td><td>{button}</td></tr>'
        )
    body = "".join(rows) or '<tr><td colspan="8" class="none">None.</td></tr>'
    return (
        f'<section id="{kind}"><h2>{e(title)}</h2><table class="jobs"><thead><tr>{head}<th>Prompt</th>'
        f"<th></th></tr></thead><tbody>{body}</tbody></table></section>"
    )


def _workers(workers: tuple[WorkerRecord, ...], board: Board) -> str:
    rows = []
    for worker in workers:
        jobs = " ".join(job_link("", job_id) for job_id in worker.jobs) or "none"
        lost = ' <span class="badge s-failed">lost</span>' if worker.lost_at else ""
        rows.append(
            f"<tr><td>{e(worker.worker_id)}{lost}</td><td>{e(worker.hostname)}:{e(worker.pid)}</td>"
            f"<td>{e(worker.presence)}</td><td>{e(', '.join(worker.queues))}</td>"
            f"<td>{duration(age_s(worker.started_at, board.now))}</td>"
            f"<td>{duration(age_s(worker.heartbeat_at, board.now))} ago</td><td>{jobs}</td></tr>"
        )
    body = "".join(rows) or '<tr><td colspan="7" class="none">No worker is registered.</td></tr>'
    return (
        '<section id="workers"><h2>Workers</h2><table><thead><tr><th>Worker</th><th>Host:pid</th>'
        "<th>Presence</th><th>Queues</th><th>Up for</th><th>Last heartbeat</th><th>Holds</th></tr></thead>"
        f"<tbody>{body}</tbody></table></section>"
    )


# -- one job -----------------------------------------------------------------------------------------------
def job_page(job: JobDetail, viewer: Viewer, now: datetime) -> str:
    root = "../"
    back = f"jobs/{job.id}"
    buttons = []
    if job.status in ("pending", "processing"):
        buttons.append(action(root, viewer, "cancel", "Cancel", back=back, job_id=job.id))
    if job.status in ("failed", "cancelled"):
        buttons.append(action(root, viewer, "retry", "Retry", back=back, job_id=job.id))
    facts = [
        ("Status", status_badge(job.status) + (" (cancellation asked)" if job.cancel_requested_at else "")),
        ("Queue", e(job.queue_name)),
        ("Actor", e(job.actor_name)),
        ("Priority", e(job.priority)),
        ("Retries", f"{job.retry_count} of {job.max_retries}"),
        ("Rescues", e(job.rescue_count)),
        ("Created", stamp(job.created_at)),
        ("Runs at", stamp(job.run_at)),
        ("Started", stamp(job.started_at)),
        ("Finished", stamp(job.completed_at)),
        ("Held by", e(job.locked_by)),
        ("User", e(job.user_id)),
        ("Idempotency key", e(job.idempotency_key)),
        ("Periodic tick", e(job.periodic_tick)),
        (
            "Prompt",
            f'<span class="prompt">{e(excerpt(job.prompt, PROMPT_CHARS))}</span>'
            + (f" ({job.prompt_length:,} characters)" if job.prompt_length else ""),
        ),
    ]
    rows = "".join(f"<tr><th scope='row'>{name}</th><td>{value}</td></tr>" for name, value in facts)
    error = ""
    if job.error_message:
        shown = e(redact(job.error_message)[:FULL_ERROR_CHARS])
        error = f'<h2>Last error</h2><pre class="error">{shown}</pre>'
    attempts = "".join(
        f"<tr><td class='num'>{a.attempt}</td><td>{e(a.worker)}</td><td>{stamp(a.started_at)}</td>"
        f"<td>{duration(age_s(a.started_at, a.ended_at) if a.ended_at else None)}</td>"
        f"<td>{status_badge(a.outcome)}</td><td class='error'>{e(excerpt(a.error, ERROR_CHARS))}</td></tr>"
        for a in reversed(job.attempts)
    )
    attempts = attempts or '<tr><td colspan="6" class="none">No attempt has ended yet.</td></tr>'
    body = (
        f'<main id="job" data-job="{e(job.id)}"><h2>Job {e(job.id)}</h2>'
        f'<p class="actions">{"".join(buttons)}</p>'
        f'<table class="facts">{rows}</table>{error}<h2>Attempts</h2><table class="attempts"><thead><tr>'
        "<th>#</th><th>Worker</th><th>Started</th><th>Took</th><th>Outcome</th><th>Error</th></tr></thead>"
        f"<tbody>{attempts}</tbody></table></main>"
    )
    return layout(f"Job {job.id[:8]}", body, root=root, viewer=viewer)


def message_page(title: str, message: str, *, root: str, viewer: Viewer) -> str:
    """A refusal or a missing job: what happened, and the way back."""
    body = (
        f'<main class="message"><h2>{e(title)}</h2><p id="message">{e(message)}</p>'
        f'<p><a href="{root or "./"}">Back to the dashboard</a></p></main>'
    )
    return layout(title, body, root=root, viewer=viewer)
