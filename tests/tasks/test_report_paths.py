"""Report folder names and URLs (tasks.paths.report_slug, report_url): what the Airflow
plugin (plugins/loraflow_reports.py) serves, and what a run's log links to."""

import re
from urllib.parse import quote

import pytest

from tasks.paths import RunPaths, report_slug, report_url

AIRFLOW_RUN_IDS = [
    "manual__2026-11-29T13:23:57.899928+00:00",
    "scheduled__2026-11-29T00:00:00+00:00",
    "asset_triggered__2026-11-29T13:23:57+00:00",
    "backfill__2026-11-22T00:00:00+00:00",
    "my-run_1.b",
]


def _unslug(slug: str) -> str:
    return re.sub(r"~([0-9A-F]{2})", lambda m: chr(int(m[1], 16)), slug)


def test_airflow_run_ids_give_readable_url_safe_folder_names():
    assert report_slug("manual__2026-11-29T13:23:57.899928+00:00") == (
        "manual__2026-11-29T13~3A23~3A57.899928~2B00~3A00")
    assert report_slug("my-run_1.b") == "my-run_1.b"  # nothing to escape: unchanged
    for run_id in AIRFLOW_RUN_IDS:
        slug = report_slug(run_id)
        assert re.fullmatch(r"[A-Za-z0-9._~-]+", slug), slug  # RFC 3986 unreserved only
        assert quote(slug, safe="") == slug  # a URL path segment as it is
        assert report_slug(run_id) == slug  # stable


@pytest.mark.parametrize("run_ids", [
    ["a:b", "a+b", "a-b", "a_b", "a.b", "a-3Ab", "a:b:"],  # naive replacing would merge some
    AIRFLOW_RUN_IDS,
])
def test_different_run_ids_never_share_a_folder(run_ids):
    slugs = [report_slug(r) for r in run_ids]
    assert len(set(slugs)) == len(run_ids)
    assert [_unslug(s) for s in slugs] == run_ids  # reversible, hence collision-free


def test_a_leading_dot_does_not_make_a_hidden_folder():
    assert report_slug(".x") == "~2Ex"
    assert not report_slug("..x").startswith(".")


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", "..", "a b"])
def test_run_ids_that_could_escape_are_refused(bad):
    with pytest.raises(ValueError, match="run id"):
        report_slug(bad)


def test_report_dir_is_the_slug_and_the_run_dir_keeps_the_raw_run_id(tmp_path):
    run_id = AIRFLOW_RUN_IDS[0]
    paths = RunPaths.for_run(run_id, tmp_path / "a", tmp_path / "r")
    assert paths.report_dir == tmp_path / "r" / report_slug(run_id)
    assert paths.run_dir == tmp_path / "a" / "runs" / run_id


def test_report_url_is_under_the_api_servers_base_url(monkeypatch):
    run_id, slug = AIRFLOW_RUN_IDS[0], report_slug(AIRFLOW_RUN_IDS[0])
    assert report_url(run_id, "https://airflow.example.com/base/") == (
        f"https://airflow.example.com/base/loraflow/reports/{slug}/report.html")
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8280")
    assert report_url(run_id) == f"http://127.0.0.1:8280/loraflow/reports/{slug}/report.html"
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "")
    assert report_url(run_id) == f"/loraflow/reports/{slug}/report.html"  # no base URL: the path
