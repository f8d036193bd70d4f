"""Airflow plugin: the experiment's HTML reports inside the Airflow UI.

- A *Report* tab on every DAG run page (external view, destination `dag_run`): it opens
  /loraflow/runs/<dag_id>/<run_id>, which redirects to that run's report.
- *LoRA reports* in the navigation: the runs index, /loraflow/reports/index.html.
- /loraflow/reports/<path> serves the files under the reports root
  (`tasks.paths.reports_root()`) at their relative paths, so the reports' relative links
  (`../index.html`, `comparison.csv`) keep working.

Only users the auth manager lets read this DAG's runs see anything (the UI's session
cookie or a Bearer token, as for the REST API: none → 401, a bad one → 403), and no path
leaves the reports root. Airflow loads this file from $AIRFLOW__CORE__PLUGINS_FOLDER
(scripts/airflow_env.sh, the tests, docker/Dockerfile).
"""

from __future__ import annotations

import functools
from pathlib import Path, PurePosixPath
from typing import Any, ClassVar
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin

from tasks.paths import report_slug, reports_root, safe_run_id
from tasks.steps import DAG_ID

URL_PREFIX = "/loraflow"  # tasks.paths.report_url builds URLs under it
REPORT_PAGE = "report.html"

# The reports are static pages without scripts; this keeps any that slipped in from running
# with the Airflow UI's origin (the tab's iframe is same-origin, scripts allowed).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'none'; style-src 'self' "
                               "'unsafe-inline'; img-src 'self' data:; frame-ancestors 'self'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # a rerun rewrites the report under the same URL
}


def resolve_file(root: Path, path: str) -> Path | None:
    """The file that `path` (relative, '/'-separated, already URL-decoded) names under
    `root`, or None: nothing outside `root` (no '..', no absolute path, no symlink that
    points out) and no hidden file (such as a half-written `.report.html.*.tmp`)."""
    parts = PurePosixPath(path).parts
    if not parts or any(part.startswith((".", "/")) or "\0" in part for part in parts):
        return None
    root = root.resolve()
    try:
        target = root.joinpath(*parts).resolve()  # follows symlinks
        return target if target.is_relative_to(root) and target.is_file() else None
    except OSError:  # a name too long for the filesystem, a loop of links: no such file
        return None


def run_folder(root: Path, run_id: str) -> str | None:
    """The folder under `root` that holds the run's report: `report_slug(run_id)`, or the
    raw run id for reports written before folders were slugs."""
    try:
        names = [report_slug(run_id), safe_run_id(run_id)]
    except ValueError:
        return None
    return next((name for name in names if resolve_file(root, f"{name}/{REPORT_PAGE}")), None)


def _not_found_page(message_html: str) -> str:
    return ("<!doctype html><meta charset='utf-8'><title>No report</title>"
            f"<body style='font-family:sans-serif;margin:2em'><p>{message_html}</p></body>")


def no_report_reason(run_id: str, state: str | None) -> str:
    """Why the run has no report, as HTML: the step that stopped it and its error
    (tasks.failures), else what the run's state says."""
    from html import escape

    from tasks import failures

    run = f"Run <code>{escape(run_id)}</code>"
    try:
        failure = failures.read(run_id)
    except ValueError:  # a run id no folder can have
        failure = None
    if failure:
        step = escape(str(failure["step"]))
        return (f"{run} has no report: it stopped in <code>{step}</code> (try "
                f"{escape(str(failure.get('attempt', 1)))}), before any variant ran.<br>"
                f"<b>Error:</b> <code>{escape(str(failure.get('error')))}</code><br>"
                f"The <code>{step}</code> task's log has the details.")
    if state in ("success", "failed"):
        return (f"{run} ended ({escape(state)}) without a report: the <code>report</code> "
                "task did not write one. Its log, and those of the failed tasks, say why.")
    return (f"{run} has no report yet: the <code>report</code> task writes it when the "
            "run's variants are done.")


def _run_state(run_id: str) -> str | None:
    """The DAG run's state from Airflow's database (the API server has it), or None."""
    try:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            state = session.scalar(select(DagRun.state).where(
                DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))
        return str(state.value if hasattr(state, "value") else state) if state else None
    except Exception:  # the page still says something true without it
        return None


def create_app() -> Any:
    """The FastAPI app the API server mounts at URL_PREFIX. FastAPI and Airflow's API
    security are imported here, not at module level: every task process loads plugins too
    (for macros), and needs neither."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag
    from fastapi import Depends, FastAPI
    from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

    app = FastAPI(
        title="loraflow reports",
        docs_url=None, redoc_url=None, openapi_url=None,
        # the user must be allowed to read this DAG's runs (401/403 otherwise)
        dependencies=[Depends(requires_access_dag("GET", DagAccessEntity.RUN,
                                                  param_dag_id=DAG_ID))],
    )

    @app.get("/runs/{dag_id}/{run_id}")
    def run_report(dag_id: str, run_id: str):
        """The Report tab: redirect to the run's report, whose relative links then resolve
        against its own URL."""
        folder = run_folder(reports_root(), run_id) if dag_id == DAG_ID else None
        if folder is None:
            why = (no_report_reason(run_id, _run_state(run_id)) if dag_id == DAG_ID
                   else f"Only <code>{DAG_ID}</code> writes reports.")
            return HTMLResponse(_not_found_page(why), status_code=404, headers=SECURITY_HEADERS)
        # relative to /loraflow/runs/<dag_id>/<run_id>, so it holds under any base URL
        return RedirectResponse(f"../../reports/{quote(folder)}/{REPORT_PAGE}",
                                status_code=307, headers={"Cache-Control": "no-cache"})

    @app.get("/reports/{path:path}")
    def report_file(path: str):
        found = resolve_file(reports_root(), path or "index.html")
        if found is None:
            why = "No reports yet." if path in ("", "index.html") else "No such report file."
            return HTMLResponse(_not_found_page(why), status_code=404, headers=SECURITY_HEADERS)
        return FileResponse(found, headers=SECURITY_HEADERS)

    return app


class LoraflowReportsPlugin(AirflowPlugin):
    name = "loraflow_reports"
    external_views: ClassVar[list[dict[str, str]]] = [
        {
            "name": "Report",
            # relative: the UI resolves it against its base URL ([api] base_url)
            "href": f"{URL_PREFIX.lstrip('/')}/runs/{{DAG_ID}}/{{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "loraflow-report",
        },
        {
            "name": "LoRA reports",
            "href": f"{URL_PREFIX.lstrip('/')}/reports/index.html",
            "destination": "nav",
            "url_route": "loraflow-reports",
        },
    ]

    @functools.cached_property
    def fastapi_apps(self) -> list[dict[str, Any]]:
        # A property, so the app is built only where it is served: the API server.
        return [{"name": "loraflow reports", "app": create_app(), "url_prefix": URL_PREFIX}]
