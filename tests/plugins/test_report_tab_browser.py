"""The Report tab as a user meets it: Chromium logs in through Airflow's login page, triggers
the `smoke` preset from the trigger form, waits for the run, and reads the report in the
run's Report tab; a browser that is not logged in is refused. The session's real Airflow
(API server, scheduler, DAG processor; SQLite, throw-away home), tests/airflow_server.py.

Screenshots go to the test's tmp folder and, when LORAFLOW_SCREENSHOTS names a folder, there.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from tasks.paths import report_slug, report_url
from tests.airflow_server import _wait  # the `airflow` fixture: the session's real Airflow
from tests.dags.conftest import DAG_ID
from tests.tasks.test_report_browser import CHROMIUM, _browser_or_skip

pytestmark = [pytest.mark.browser, pytest.mark.scheduler, pytest.mark.slow]

SMALL = {"train_size": 64, "test_size": 32, "max_length": 32}  # typed into the form, too


def _password(cluster) -> str:
    passwords = cluster.home / "simple_auth_manager_passwords.json.generated"
    return json.loads(passwords.read_text())["admin"]


def _screenshot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    if folder := os.environ.get("LORAFLOW_SCREENSHOTS"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, Path(folder) / name)
    return shot


@pytest.mark.timeout(900)  # includes starting Airflow and a smoke run (2-5 minutes here)
def test_a_logged_in_user_triggers_smoke_and_reads_the_report_tab(airflow, tmp_path):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)  # a loaded 2-core machine
            csp_errors: list[str] = []
            page.on("console", lambda m: csp_errors.append(m.text)
                    if m.type == "error" and "Content Security Policy" in m.text else None)

            # Airflow's own login page
            page.goto(f"{airflow.url}/dags/{DAG_ID}")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(_password(airflow))
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"**/dags/{DAG_ID}")

            # The trigger form: pick `smoke` (the default is `cpu`), shrink it further.
            page.get_by_role("button", name="Trigger").first.click()
            form = page.get_by_role("dialog")
            form.locator("#element_preset").click()  # in the section that opens by itself
            page.get_by_role("option", name=re.compile(r"^smoke")).click()
            _screenshot(page, tmp_path, "trigger_form.png")
            form.locator("#element_methods").click()  # one method: a shorter run
            page.get_by_role("option", name="majority", exact=True).click()
            form.get_by_role("button", name="Data subset").click()
            for name, value in SMALL.items():
                form.locator(f"input[name=element_{name}]").fill(str(value))
            with page.expect_response(lambda r: r.request.method == "POST"
                                      and r.url.endswith(f"/dags/{DAG_ID}/dagRuns")) as created:
                form.get_by_role("button", name="Trigger", exact=True).click()
            assert created.value.status == 200, created.value.text()
            run = created.value.json()
            assert run["conf"]["preset"] == "smoke"
            assert {k: run["conf"][k] for k in SMALL} == SMALL
            assert run["conf"]["methods"] == ["majority"]

            run_api = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run['dag_run_id'], safe='')}"

            def finished():
                state = airflow.client.get(run_api).raise_for_status().json()["state"]
                return state if state in ("success", "failed") else None

            assert _wait("the smoke run", finished, timeout=600, every=3) == "success"

            # The run's page (where the form left us), Report tab: the report, logged in by
            # the session cookie the login page set.
            page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{quote(run['dag_run_id'], safe='')}")
            page.get_by_role("link", name="Report", exact=True).click()  # the plugin's tab
            report = page.frame_locator("iframe[title='Report']")
            headline = report.locator("#headline")
            headline.wait_for()
            assert "LoRA" in headline.inner_text()
            _screenshot(page, tmp_path, "report_tab.png")

            # Its relative link to all runs works inside the tab too.
            report.get_by_role("link", name="all runs").click()
            names = (run["dag_run_id"], report_slug(run["dag_run_id"]))  # folder name either way
            report.get_by_role("link", name=re.compile("|".join(map(re.escape, names)))).wait_for()
            _screenshot(page, tmp_path, "report_tab_index.png")
        finally:
            browser.close()
    assert csp_errors == []  # the report needs nothing the plugin's CSP forbids


@pytest.mark.timeout(600)
def test_the_report_url_refuses_a_browser_that_is_not_logged_in(airflow, tmp_path):
    sync_playwright = _browser_or_skip()
    run_id = "manual__2026-11-29T13:23:57.899928+00:00"
    folder = airflow.reports / report_slug(run_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.html").write_text('<section id="headline">private</section>')
    url = report_url(run_id, airflow.url)

    # The API server lists the plugin, and a logged-in client (token) reads the report.
    plugins = airflow.client.get("/api/v2/plugins").raise_for_status().json()["plugins"]
    assert "loraflow_reports" in [p["name"] for p in plugins]
    assert "private" in airflow.client.get(url).raise_for_status().text

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page()  # a fresh context: no session cookie
            for address in (url, f"{airflow.url}/loraflow/runs/{DAG_ID}/{quote(run_id)}"):
                response = page.goto(address)
                assert response.status in (401, 403), address
                assert "private" not in page.content()
        finally:
            browser.close()

    # Even logged in, a literal '..' (sent as is, unlike browsers and httpx) gets nowhere.
    (airflow.reports.parent / "secret.txt").write_text("secret")
    server = urlsplit(airflow.url)
    connection = http.client.HTTPConnection(server.hostname, server.port, timeout=30)
    connection.request("GET", "/loraflow/reports/../secret.txt",
                       headers={"Authorization": airflow.client.headers["Authorization"]})
    response = connection.getresponse()
    assert response.status == 404 and b"secret" not in response.read()
