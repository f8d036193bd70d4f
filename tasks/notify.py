"""Notifications of a DAG run through one Airflow connection: a failed run (a regression
included, named as such), a successful run (its headline and report URL), and a run that
exceeds its deadline each send one message.

`$LORAFLOW_NOTIFY_CONN_ID` names the connection when the DAG is parsed; without it the DAG
gets no callbacks and no deadline, so nothing is sent. The connection's type picks the
channel:

- `smtp` (apache-airflow-providers-smtp, installed): host, port, login/password, extras
  `from_email` and `to` (recipients, comma-separated), `disable_ssl`/`disable_tls` for a
  plain relay. Sent with the provider's `SmtpNotifier`.
- `slackwebhook` (apache-airflow-providers-slack, not installed here): the provider's
  `SlackWebhookNotifier`; without the provider the message is refused with that reason.

A connection id that names no connection sends nothing and logs a warning. The DAG-level
callbacks run in the DAG processor (sync `notify`), the deadline callback in the triggerer
(`async_notify`); both need this package importable there, as the DAG file does.
"""

from __future__ import annotations

import asyncio
import html
import logging
import os
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)
CONN_ENV = "LORAFLOW_NOTIFY_CONN_ID"
DEADLINE_ENV = "LORAFLOW_DEADLINE_HOURS"
DEFAULT_DEADLINE = timedelta(hours=24)
EVENTS = ("failed", "succeeded", "deadline")


def conn_id() -> str | None:
    return os.environ.get(CONN_ENV, "").strip() or None


def deadline() -> timedelta:
    """How long a run may take before the deadline message: `$LORAFLOW_DEADLINE_HOURS`
    (a number, fractions allowed), else 24 hours."""
    raw = os.environ.get(DEADLINE_ENV, "").strip()
    if not raw:
        return DEFAULT_DEADLINE
    try:
        hours = float(raw)
    except ValueError:
        raise ValueError(f"{DEADLINE_ENV}={raw!r} is not a number of hours") from None
    if not hours > 0:
        raise ValueError(f"{DEADLINE_ENV}={raw!r} must be more than 0 hours")
    return timedelta(hours=hours)


class RunNotifier(BaseNotifier):
    """One message about a DAG run of loraflow, through the connection `conn_id`."""

    template_fields = ()  # the message is composed from the run's files, not templated

    def __init__(self, conn_id: str, event: str, context: dict[str, Any] | None = None):
        super().__init__(context=context)
        if event not in EVENTS:
            raise ValueError(f"unknown notification event {event!r}; expected one of {EVENTS}")
        self.conn_id, self.event = conn_id, event

    def notify(self, context: dict[str, Any]) -> None:
        message = compose(self.event, context)
        notifier = _channel(self.conn_id, *message, run_id=_run_id(context))
        if notifier is not None:
            notifier.notify(context)
            log.info("%s notification sent through %s: %s", self.event, self.conn_id, message[0])

    async def async_notify(self, context: dict[str, Any]) -> None:
        # the deadline runs in the triggerer's event loop; reading the connection and the
        # run's files are blocking calls
        message = await asyncio.to_thread(compose, self.event, context)
        notifier = await asyncio.to_thread(_channel, self.conn_id, *message,
                                           run_id=_run_id(context))
        if notifier is not None:
            await asyncio.to_thread(notifier.notify, context)
            log.info("%s notification sent through %s: %s", self.event, self.conn_id, message[0])


def _channel(conn_id: str, subject: str, body: str,
             run_id: str = "") -> BaseNotifier | None:
    """The provider's notifier for the connection's type, or None when the connection
    does not exist."""
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as err:  # AirflowNotFoundException; its import path moves between versions
        log.warning("no notification sent for run %s: connection %r is not defined (%s)",
                    run_id, conn_id, err)
        return None
    kind = (conn.conn_type or "").lower()
    if kind in ("smtp", "email"):
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        to = [a.strip() for a in str(conn.extra_dejson.get("to") or "").split(",") if a.strip()]
        if not to:
            raise ValueError(f"connection {conn_id!r} has no recipients: set its extra "
                             '"to" (comma-separated addresses)')
        body_html = "<pre style=\"font-family:inherit;white-space:pre-wrap\">" \
                    f"{html.escape(body)}</pre>"
        return SmtpNotifier(to=to, subject=subject, html_content=body_html,
                            smtp_conn_id=conn_id)
    if kind.startswith("slack"):
        try:
            from airflow.providers.slack.notifications.slack_webhook import (
                SlackWebhookNotifier,
            )
        except ImportError:
            raise ValueError(f"connection {conn_id!r} is a Slack connection, but "
                             "apache-airflow-providers-slack is not installed") from None
        return SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=f"*{subject}*\n{body}")
    raise ValueError(f"connection {conn_id!r} has type {conn.conn_type!r}; notifications "
                     "support smtp and slackwebhook")


def _run_id(context: dict[str, Any]) -> str:
    dag_run = context.get("dag_run")
    if isinstance(dag_run, dict):  # the deadline's context: the run as the REST API shows it
        return str(dag_run.get("dag_run_id") or dag_run.get("run_id") or "unknown run")
    return str(context.get("run_id") or getattr(dag_run, "run_id", None) or "unknown run")


def _summary(run_id: str) -> dict[str, Any] | None:
    from tasks.paths import read_json, report_slug, reports_root

    try:
        data = read_json(reports_root() / report_slug(run_id) / "summary.json")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _regression_lines(since: dict[str, Any]) -> list[str]:
    lines = [f"Regression since run {since['previous']['run_id']} on the same test reviews:"]
    for r in since.get("comparisons", []):
        if r.get("regression"):
            lines.append(f"  {r['method_label']}: {100 * r['previous_accuracy']:.1f}% -> "
                         f"{100 * r['accuracy']:.1f}% ({100 * r['diff']:+.1f} points, 95% "
                         f"interval [{100 * r['ci95'][0]:+.1f}, {100 * r['ci95'][1]:+.1f}])")
    changed = [f"{c['what']} {c['before']} -> {c['after']}" for c in since.get("changes", [])
               if c.get("changed")]
    lines.append("Changed since then: " + ("; ".join(changed) or "nothing recorded"))
    return lines


def compose(event: str, context: dict[str, Any]) -> tuple[str, str]:
    """(subject, plain-text body) of the message, from the run's summary.json when the
    report was written."""
    from tasks import failures
    from tasks.paths import report_url

    run_id = _run_id(context)
    dag_id = getattr(context.get("dag"), "dag_id", None) or "lora_imdb_experiment"
    summary = _summary(run_id)
    url = report_url(run_id) if summary is not None else None
    since = (summary or {}).get("since_last_comparable") or {}
    regression = isinstance(since, dict) and since.get("regression") is True
    lines = [f"DAG {dag_id}, run {run_id}."]
    if event == "succeeded":
        subject = f"[loraflow] run {run_id} succeeded"
        lines.append((summary or {}).get("headline") or "No report summary was found.")
    elif event == "deadline":
        subject = f"[loraflow] run {run_id} passed its deadline"
        when = (context.get("deadline") or {}).get("deadline_time")
        lines.append(f"The run is still going after its deadline ({when}, "
                     f"{DEADLINE_ENV} sets it); check its tasks in the Airflow UI.")
    elif regression:
        subject = f"[loraflow] run {run_id} failed: regression since {since['previous']['run_id']}"
        lines += _regression_lines(since)
    else:
        subject = f"[loraflow] run {run_id} failed"
        ti = context.get("ti")
        reason = context.get("reason") or "failed"
        lines.append(f"Reason: {reason}." + (f" Last task: {ti.task_id}." if ti else ""))
        stopped = failures.read(run_id)  # the step that stopped the run, with its error
        if stopped:
            lines.append(failures.sentence(stopped))
        if summary is None:
            lines.append("No report was written (the run failed before its report task).")
    if url:
        lines.append(f"Report: {url}")
    return subject, "\n".join(lines)
