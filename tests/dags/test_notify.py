"""Notifications (tasks/notify.py) and the assets' event payloads (tasks/assets.py), cheap:
the messages composed from a run's summary.json, and the deadline callback run the way the
triggerer runs it (airflow.triggers.callback.CallbackTrigger) against a real SMTP server."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from email import message_from_bytes
from email.policy import default as email_policy
from types import SimpleNamespace

import pytest

from tasks import assets, notify
from tasks.paths import report_slug, write_json

RUN_ID = "scheduled__2026-12-06T00:00:00+00:00"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def reports(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAFLOW_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://airflow.example:8080")
    return tmp_path / "reports"


def _summary(reports, **extra):
    write_json(reports / report_slug(RUN_ID) / "summary.json", {
        "run_id": RUN_ID, "preset": "cpu", "headline": "On test, LoRA 84.4%; full 83.1%.",
        "selected": {"lora": {"configuration": "lora_r16_qkvo_lr2e-3", "label": "LoRA r=16",
                              "validation_accuracy": 0.85, "accuracy": 0.844, "seeds": 1}},
        **extra})


REGRESSION = {"previous": {"run_id": "scheduled__2026-11-29T00:00:00+00:00"},
              "regression": True, "regressed": ["lora"],
              "comparisons": [{"method": "lora", "method_label": "LoRA", "regression": True,
                               "previous_accuracy": 0.844, "accuracy": 0.80, "diff": -0.044,
                               "ci95": [-0.07, -0.02]}],
              "changes": [{"what": "torch", "before": "2.13.0", "after": "2.14.0",
                           "changed": True},
                          {"what": "device", "before": "AMD EPYC", "after": "AMD EPYC",
                           "changed": False}]}


def test_success_message_has_the_headline_and_the_report_url(reports):
    _summary(reports)
    subject, body = notify.compose("succeeded", {"run_id": RUN_ID})
    assert subject == f"[loraflow] run {RUN_ID} succeeded"
    assert "On test, LoRA 84.4%" in body
    assert (f"Report: http://airflow.example:8080/loraflow/reports/{report_slug(RUN_ID)}"
            "/report.html") in body


def test_a_regression_is_named_in_the_failure_message(reports):
    _summary(reports, since_last_comparable=REGRESSION)
    subject, body = notify.compose("failed", {"run_id": RUN_ID, "reason": "task_failure"})
    assert subject == (f"[loraflow] run {RUN_ID} failed: regression since "
                       "scheduled__2026-11-29T00:00:00+00:00")
    assert "LoRA: 84.4% -> 80.0% (-4.4 points, 95% interval [-7.0, -2.0])" in body
    assert "Changed since then: torch 2.13.0 -> 2.14.0" in body and "AMD" not in body


def test_a_run_that_failed_before_its_report_says_so(reports):
    from tasks import failures

    with pytest.raises(ValueError), failures.recorded(RUN_ID, "prepare"):
        raise ValueError("the run cannot start: data folder 'x' does not exist")
    subject, body = notify.compose("failed", {
        "run_id": RUN_ID, "reason": "task_failure", "ti": SimpleNamespace(task_id="prepare")})
    assert subject == f"[loraflow] run {RUN_ID} failed"
    assert "Last task: prepare." in body and "No report was written" in body
    assert ("The run stopped in prepare (try 1): the run cannot start: data folder 'x' does "
            "not exist") in body
    assert "Report:" not in body


def test_a_connection_id_without_a_connection_sends_nothing(reports, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_NOWHERE", raising=False)
    assert notify._channel("nowhere", "s", "b") is None


def test_the_deadline_callback_sends_one_message_through_the_connection(reports, monkeypatch):
    from aiosmtpd.controller import Controller
    from airflow.triggers.callback import CallbackTrigger

    received = []

    class Mailbox:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            received.append(message_from_bytes(envelope.content, policy=email_policy))
            return "250 OK"

    port = int(os.environ.get("LORAFLOW_TEST_PORT_BASE", 0)) + 4 if os.environ.get(
        "LORAFLOW_TEST_PORT_BASE") else _free_port()
    controller = Controller(Mailbox(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_LORAFLOW_MAIL", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": {"from_email": "loraflow@example.com",
                                         "to": "a@example.com, b@example.com",
                                         "disable_ssl": True, "disable_tls": True}}))
        # what the scheduler queues for the triggerer when the deadline passes
        trigger = CallbackTrigger("tasks.notify.RunNotifier", {
            "conn_id": "loraflow_mail", "event": "deadline",
            "context": {"dag_run": {"dag_run_id": RUN_ID, "dag_id": "lora_imdb_experiment"},
                        "deadline": {"deadline_time": "2026-12-07T00:00:00+00:00"}}})

        async def run():
            return [event.payload async for event in trigger.run()]

        payloads = asyncio.run(run())
    finally:
        controller.stop()
    assert payloads[-1]["state"] == "success", payloads
    [message] = received
    assert message["Subject"] == f"[loraflow] run {RUN_ID} passed its deadline"
    assert message["To"] == "a@example.com, b@example.com"
    assert "2026-12-07T00:00:00+00:00" in message.get_body(("html", "plain")).get_content()


def test_deadline_hours_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAFLOW_DEADLINE_HOURS", "0.5")
    assert notify.deadline().total_seconds() == 1800
    monkeypatch.setenv("LORAFLOW_DEADLINE_HOURS", "soon")
    with pytest.raises(ValueError, match="LORAFLOW_DEADLINE_HOURS='soon' is not a number"):
        notify.deadline()


class _Event(SimpleNamespace):
    pass


def test_run_params_come_from_the_latest_data_event_and_unknown_names_are_refused():
    from airflow.sdk import Asset

    data, other = Asset(**assets.DATA), Asset(name="elsewhere", uri="x-other://a")
    events = {data: [_Event(extra={"params": {"preset": "cpu"}}, timestamp="2026-12-01T01"),
                     _Event(extra={"params": {"preset": "smoke"}}, timestamp="2026-12-01T02"),
                     _Event(extra={}, timestamp="2026-12-01T03")],
              other: [_Event(extra={"params": {"preset": "paper"}}, timestamp="2026-12-01T04")]}
    assert assets.params_from_events(events, {"preset"}) == {"preset": "smoke"}
    assert assets.params_from_events(None, {"preset"}) == {}
    with pytest.raises(ValueError, match=r"unknown parameters \['rank'\]"):
        assets.params_from_events({data: [_Event(extra={"params": {"rank": 4}})]}, {"preset"})


def test_outlet_extras_name_the_selected_configurations_and_the_adapter(tmp_path):
    run_dir = tmp_path / "runs" / "r1"
    for name in ("lora_r16_qkvo_lr2e-3_s1", "lora_r16_qkvo_lr2e-3_s2", "lora_r8_qkvo_lr2e-3_s1"):
        (run_dir / "results" / name / "adapter").mkdir(parents=True)
    summary = {"preset": "cpu", "model": "embedded-minilm", "headline": "h",
               "selected": {"lora": {"configuration": "lora_r16_qkvo_lr2e-3", "label": "LoRA",
                                     "validation_accuracy": 0.85, "accuracy": 0.84, "seeds": 2},
                            "majority": {"configuration": "majority", "label": "majority",
                                         "validation_accuracy": 0.5, "accuracy": 0.49,
                                         "seeds": 1}}}
    report, adapter = assets.outlet_extras("r1", run_dir, summary, "http://x/report.html")
    assert report["selected"]["lora"]["accuracy"] == 0.84 and report["report_url"].endswith(
        "report.html")
    assert adapter["adapter_path"] == str(run_dir / "results" / "lora_r16_qkvo_lr2e-3_s1" / "adapter")
    assert len(adapter["adapter_paths"]) == 2  # one per seed, not the r=8 configuration
    _, none = assets.outlet_extras("r1", run_dir, {"selected": {}}, "u")
    assert none["adapter_path"] is None and none["configuration"] is None
