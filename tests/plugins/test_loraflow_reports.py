"""plugins/loraflow_reports.py on its own: which files it serves from the reports root and
where the Report tab leads. Authentication is Airflow's and is tested against the real API
server (test_plugin_in_api_server.py); here it is switched off."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from tasks.paths import report_slug, report_url
from tasks.report import build_index, build_report
from tests.dags.conftest import DAG_ID, PLUGINS_DIR, airflow_env
from tests.tasks.fixtures_report import make_run

RUN_ID = "manual__2026-11-29T13:23:57.899928+00:00"
SECRET = "not for report readers"


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    """A reports root with a real report in the run's slug folder, an older report in a
    raw-run-id folder, and a secret next to (outside) the root."""
    base = tmp_path_factory.mktemp("plugin")
    root = base / "reports"
    report = build_report(make_run(base, run_id=RUN_ID).run_dir, root)
    if report.parent.name != report_slug(RUN_ID):  # tasks.report writes <root>/<run_id>
        report.parent.rename(root / report_slug(RUN_ID))
        build_index(root)
    (root / "older+run").mkdir()
    (root / "older+run" / "report.html").write_text("<h1>an older run</h1>")
    (root / "older+run" / ".report.html.x.tmp").write_text(SECRET)  # being written
    (base / "secret.txt").write_text(SECRET)
    return root


@pytest.fixture
def client(reports, monkeypatch):
    """The plugin's app mounted as the API server mounts it, without Airflow's access
    check (that needs Airflow's DB; test_plugin_in_api_server.py tests it)."""
    import loraflow_reports
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    monkeypatch.setenv("LORAFLOW_REPORTS", str(reports))
    app = loraflow_reports.create_app()
    app.dependency_overrides[app.router.dependencies[0].dependency] = lambda: None
    server = FastAPI()
    server.mount(loraflow_reports.URL_PREFIX, app)
    with TestClient(server) as client:
        yield client


def test_a_report_and_its_relative_links_are_served(client):
    slug = report_slug(RUN_ID)
    page = client.get(f"/loraflow/reports/{slug}/report.html")
    assert page.status_code == 200 and 'id="headline"' in page.text
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'none'" in page.headers["content-security-policy"]
    # the page's own links, resolved against its URL
    assert 'href="../index.html"' in page.text and 'href="comparison.csv"' in page.text
    index = client.get(f"/loraflow/reports/{slug}/../index.html")  # as a browser resolves it
    assert index.status_code == 200 and f'href="./{slug}/report.html"' in index.text
    csv = client.get(f"/loraflow/reports/{slug}/comparison.csv")
    assert csv.status_code == 200 and csv.text.startswith("name,method,label")
    assert client.get("/loraflow/reports/").text == index.text  # the folder: its index


def test_report_url_is_a_path_the_plugin_serves(client):
    page = client.get(report_url(RUN_ID, base_url="http://testserver"))
    assert page.status_code == 200 and RUN_ID in page.text


@pytest.mark.parametrize("path", [
    "%2e%2e/secret.txt",                  # ../secret.txt, percent-encoded
    "%2E%2E%2Fsecret.txt",
    "x/..%2f..%2fsecret.txt",
    "%2Fetc%2Fpasswd",                    # absolute
    "older+run/%2e%2e/%2e%2e/secret.txt",
    "older+run/.report.html.x.tmp",       # hidden: a half-written file
    "%00",
    "a" * 5000,                            # File name too long: was a 500 with a traceback
    "x/" + "b" * 300 + "/report.html",
])
def test_no_path_leaves_the_reports_root(client, path):
    response = client.get(f"/loraflow/reports/{path}")
    assert response.status_code == 404
    assert SECRET not in response.text and "root:" not in response.text


def test_before_the_first_report_the_index_says_so(client, monkeypatch, tmp_path):
    monkeypatch.setenv("LORAFLOW_REPORTS", str(tmp_path / "no-reports-yet"))
    for path in ("", "index.html"):
        page = client.get(f"/loraflow/reports/{path}")
        assert page.status_code == 404 and "No reports yet" in page.text


def test_symlinks_out_of_the_root_are_not_followed(client, reports):
    (reports / "out.txt").symlink_to(reports.parent / "secret.txt")
    (reports / "outdir").symlink_to(reports.parent, target_is_directory=True)
    (reports / "inside.html").symlink_to(reports / "index.html")
    try:
        assert client.get("/loraflow/reports/out.txt").status_code == 404
        assert client.get("/loraflow/reports/outdir/secret.txt").status_code == 404
        assert client.get("/loraflow/reports/inside.html").status_code == 200
    finally:
        for name in ("out.txt", "outdir", "inside.html"):
            (reports / name).unlink()


def test_the_report_tab_redirects_to_the_runs_report(client):
    tab = client.get(f"/loraflow/runs/{DAG_ID}/{quote(RUN_ID, safe='')}", follow_redirects=False)
    assert tab.status_code == 307
    assert tab.headers["location"] == f"../../reports/{report_slug(RUN_ID)}/report.html"
    assert 'id="headline"' in client.get(f"/loraflow/runs/{DAG_ID}/{quote(RUN_ID)}").text


def test_the_report_tab_finds_reports_written_under_the_raw_run_id(client):
    tab = client.get(f"/loraflow/runs/{DAG_ID}/older+run", follow_redirects=False)
    assert tab.headers["location"] == "../../reports/older%2Brun/report.html"
    assert "an older run" in client.get(f"/loraflow/runs/{DAG_ID}/older+run").text


@pytest.mark.parametrize("dag_id, run_id, says", [
    (DAG_ID, "manual__2026-01-01T00:00:00+00:00", "has no report yet"),
    ("other_dag", RUN_ID, f"Only <code>{DAG_ID}</code> writes reports"),
    (DAG_ID, "<img src=x onerror=alert(1)>", "has no report yet"),
])
def test_the_report_tab_of_a_run_without_report_says_why(client, dag_id, run_id, says):
    page = client.get(f"/loraflow/runs/{dag_id}/{quote(run_id, safe='')}")
    assert page.status_code == 404 and says in page.text
    assert "<img" not in page.text  # the run id is escaped


def test_the_plugin_declares_the_report_tab_and_the_runs_index():
    import loraflow_reports

    views = {v["destination"]: v for v in loraflow_reports.LoraflowReportsPlugin.external_views}
    assert views["dag_run"]["href"] == "loraflow/runs/{DAG_ID}/{RUN_ID}"
    assert views["nav"]["href"] == "loraflow/reports/index.html"
    assert loraflow_reports.DAG_ID == DAG_ID


def test_loading_the_plugin_imports_neither_fastapi_nor_torch():
    # Every task process loads plugins (for macros); the app is built only when served.
    code = ("import sys, loraflow_reports; "
            "print(sorted({'fastapi', 'torch', 'airflow.api_fastapi.app'} & set(sys.modules)))")
    env = airflow_env(PYTHONPATH=os.pathsep.join([str(PLUGINS_DIR), airflow_env()["PYTHONPATH"]]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_docker_image_puts_the_plugin_where_airflow_looks():
    # docker/Dockerfile: AIRFLOW_HOME=/opt/airflow, whose plugins/ is Airflow's default
    # plugins folder; nothing in docker/ points Airflow elsewhere.
    docker = PLUGINS_DIR.parent / "docker"
    dockerfile = (docker / "Dockerfile").read_text()
    assert re.search(r"^ENV AIRFLOW_HOME=/opt/airflow\b", dockerfile, re.MULTILINE)
    assert re.search(r"^COPY\b.* plugins /opt/airflow/plugins$", dockerfile, re.MULTILINE)
    assert "!plugins/" in (docker / "Dockerfile.dockerignore").read_text().split()
    assert "PLUGINS_FOLDER" not in (docker / "docker-compose.yaml").read_text()
