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
from tasks.pipeline import config_from_params
from tests.airflow_server import _wait  # the `airflow` fixture: the session's real Airflow
from tests.dags.conftest import DAG_ID
from tests.tasks.test_report_browser import CHROMIUM, LAYOUT_PROBLEMS, _browser_or_skip

pytestmark = [pytest.mark.browser, pytest.mark.scheduler, pytest.mark.slow]

SMALL = {"train_size": 64, "test_size": 32, "max_length": 32}  # typed into the form, too
TYPED = {"lora_lr": "1e-3, 2e-3", "full_lr": "5e-5\n1e-4"}  # sweep lists typed key by key


def _password(cluster) -> str:
    passwords = cluster.home / "simple_auth_manager_passwords.json.generated"
    return json.loads(passwords.read_text())["admin"]


def _log(cluster, run_id: str, task_id: str, attempt: int = 1) -> str:
    """The task's log, one record a line (its message and any exception's text), through
    the REST API, as the UI shows it."""
    url = (f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances/{task_id}"
           f"/logs/{attempt}")
    response = cluster.client.get(url, params={"full_content": True},
                                  headers={"Accept": "application/json"})
    content = response.raise_for_status().json()["content"]
    if isinstance(content, str):
        return content
    return "\n".join(json.dumps(e, ensure_ascii=False)[1:-1] if isinstance(e, dict) else str(e)
                     for e in content)


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
            # Sweep lists typed key by key, as a person types them (Airflow's JSON editor
            # used to rewrite `[0.001, 0.002]` mid-typing into a syntax error)
            form.get_by_role("button", name="Sweep").click()
            for name, text in TYPED.items():
                form.locator(f"#element_{name}").click()
                page.keyboard.type(text, delay=30)
                assert form.locator(f"#element_{name}").input_value() == text  # not rewritten
            _screenshot(page, tmp_path, "trigger_form_sweep.png")
            with page.expect_response(lambda r: r.request.method == "POST"
                                      and r.url.endswith(f"/dags/{DAG_ID}/dagRuns")) as created:
                form.get_by_role("button", name="Trigger", exact=True).click()
            assert created.value.status == 200, created.value.text()
            run = created.value.json()
            assert run["conf"]["preset"] == "smoke"
            assert {k: run["conf"][k] for k in SMALL} == SMALL
            assert run["conf"]["methods"] == ["majority"]
            assert {k: run["conf"][k] for k in TYPED} == TYPED  # the lists as typed...
            config = config_from_params(run["conf"])  # ...which prepare reads as lists
            assert (config.lora_lr, config.full_lr) == ((1e-3, 2e-3), (5e-5, 1e-4))

            run_api = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run['dag_run_id'], safe='')}"

            def finished():
                state = airflow.client.get(run_api).raise_for_status().json()["state"]
                return state if state in ("success", "failed") else None

            assert _wait("the smoke run", finished, timeout=600, every=3) == "success"
            # prepare's log: the resolved settings, in order, the typed lists among them
            log = _log(airflow, run["dag_run_id"], "prepare")
            assert "lora_lr        0.001, 0.002" in log and "full_lr        5e-05, 0.0001" in log
            assert log.index("Resolved configuration:") < log.index("1 variant(s):") < log.index(
                '"  majority"') < log.index("checks passed")  # one record a line, in order

            # The run's page (where the form left us), Report tab: the report, logged in by
            # the session cookie the login page set.
            page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{quote(run['dag_run_id'], safe='')}")
            _screenshot(page, tmp_path, "run_page.png")
            # the plugin's tab (the UI lists it once /api/v2/plugins answered: slow under load)
            page.get_by_role("link", name="Report", exact=True).click(timeout=180_000)
            report = page.frame_locator("iframe[title='Report']")
            headline = report.locator("#headline")
            headline.wait_for()
            assert "LoRA" in headline.inner_text()
            _screenshot(page, tmp_path, "report_tab.png")
            # the report in the tab's frame (about 1032 px wide in a 1400 px window) is laid
            # out for that width: no sideways scroll, no block over another
            frame = page.frame_locator("iframe[title='Report']").locator("body")
            width = frame.evaluate("() => document.documentElement.clientWidth")
            assert 900 < width < 1200, width
            assert frame.evaluate(LAYOUT_PROBLEMS) == []

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


@pytest.mark.timeout(600)
def test_a_run_that_stops_in_prepare_says_so_in_check_variants_and_the_report_tab(
        airflow, tmp_path):
    """A conf key the schema lets through (it allows extra keys) but the config refuses:
    `prepare` fails, no variant runs, and both places a user looks name the real error."""
    sync_playwright = _browser_or_skip()
    created = airflow.trigger({"preset": "smoke", "methods": ["majority"], "lora_rl": "1e-3"})
    assert created.status_code == 200, created.text
    run_id = created.json()["dag_run_id"]
    run_api = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"

    def finished():
        state = airflow.client.get(run_api).raise_for_status().json()["state"]
        return state if state in ("success", "failed") else None

    assert _wait("the run with a bad conf key", finished, timeout=400, every=3) == "failed"
    tis = airflow.client.get(f"{run_api}/taskInstances").raise_for_status().json()
    states = {t["task_id"]: t["state"] for t in tis["task_instances"]}
    assert (states["prepare"], states["check_variants"]) == ("failed", "failed"), states

    error = "unknown config fields ['lora_rl']"
    check = _log(airflow, run_id, "check_variants")
    assert f"The run stopped in prepare (try 1): {error}" in check
    assert "No variant ran. There is no report" in check
    assert "its error is in the report" not in check  # the old, wrong words
    assert "preset smoke with overrides" in _log(airflow, run_id, "prepare")

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM))
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{airflow.url}/dags/{DAG_ID}")
            page.get_by_label("Username").fill("admin")
            page.get_by_label("Password").fill(_password(airflow))
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(f"**/dags/{DAG_ID}")
            page.goto(f"{airflow.url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}")
            page.get_by_role("link", name="Report", exact=True).click(timeout=180_000)
            tab = page.frame_locator("iframe[title='Report']").locator("body")
            tab.get_by_text("stopped in").wait_for()
            text = tab.inner_text()
            _screenshot(page, tmp_path, "report_tab_prepare_failed.png")
        finally:
            browser.close()
    assert "has no report: it stopped in prepare (try 1), before any variant ran." in text
    assert error in text
    assert "when the run's variants are done" not in text
