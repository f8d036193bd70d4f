"""The plugin inside Airflow's real API server app (in this process, SQLite in the tests'
throw-away home): Airflow loads it from the plugins folder, lists it, mounts its app, and
lets only authenticated users read reports, by token or by the UI's session cookie."""

from __future__ import annotations

import json
import secrets

import pytest

from tasks.paths import report_slug, report_url

pytestmark = pytest.mark.slow

RUN_ID = "manual__2026-11-29T13:23:57.899928+00:00"
PASSWORD = secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def api(airflow_db, tmp_path_factory):
    """(client, reports root) for Airflow's API server app with the project's plugins."""
    from airflow.api_fastapi.app import create_app
    from fastapi.testclient import TestClient

    reports = tmp_path_factory.mktemp("reports")
    (reports / report_slug(RUN_ID)).mkdir()
    (reports / report_slug(RUN_ID) / "report.html").write_text('<p id="headline">ok</p>')
    (reports.parent / "secret.txt").write_text("secret")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORAFLOW_REPORTS", str(reports))
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
        env.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(64))
        (airflow_db / "simple_auth_manager_passwords.json.generated").write_text(
            json.dumps({"admin": PASSWORD}))
        with TestClient(create_app()) as client:
            yield client, reports


def _token(client) -> str:
    response = client.post("/auth/token", json={"username": "admin", "password": PASSWORD})
    return response.raise_for_status().json()["access_token"]


def test_airflow_lists_the_plugin_with_its_app_and_views(api):
    client, _ = api
    headers = {"Authorization": f"Bearer {_token(client)}"}
    plugins = client.get("/api/v2/plugins", headers=headers).raise_for_status().json()["plugins"]
    plugin = next(p for p in plugins if p["name"] == "loraflow_reports")
    assert [a["url_prefix"] for a in plugin["fastapi_apps"]] == ["/loraflow"]
    assert {v["destination"] for v in plugin["external_views"]} == {"dag_run", "nav"}
    errors = client.get("/api/v2/plugins/importErrors", headers=headers).json()
    assert errors["import_errors"] == []


@pytest.mark.parametrize("path", [
    report_url(RUN_ID, base_url=""),
    "/loraflow/reports/index.html",
    f"/loraflow/runs/lora_imdb_experiment/{RUN_ID}",
])
def test_reports_need_a_logged_in_user(api, path):
    client, _ = api
    client.cookies.clear()
    assert client.get(path).status_code == 401  # no credentials
    assert client.get(path, headers={"Authorization": "Bearer forged"}).status_code == 403


def test_a_token_or_the_uis_session_cookie_reads_a_report(api):
    client, _ = api
    token = _token(client)
    url = report_url(RUN_ID, base_url="")
    by_token = client.get(url, headers={"Authorization": f"Bearer {token}"})
    assert by_token.status_code == 200 and 'id="headline"' in by_token.text
    client.cookies.set("_token", token)  # what the login page leaves in the browser
    try:
        tab = client.get(f"/loraflow/runs/lora_imdb_experiment/{RUN_ID}")
        assert tab.status_code == 200 and 'id="headline"' in tab.text
    finally:
        client.cookies.clear()


def test_a_logged_in_user_still_cannot_leave_the_reports_root(api):
    client, _ = api
    headers = {"Authorization": f"Bearer {_token(client)}"}
    for path in ("%2e%2e/secret.txt", "x/..%2f..%2fsecret.txt", "%2Fetc%2Fpasswd"):
        response = client.get(f"/loraflow/reports/{path}", headers=headers)
        assert response.status_code == 404 and "secret" not in response.text
