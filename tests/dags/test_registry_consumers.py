"""Every consumer of the method registry knows every method, so a new entry in
tasks/registry.py cannot be half-wired: the config, the CLI's choices, the DAG's trigger
form and its GPU routing, the method's module, and the report's labels and colours.

(The benchmark, bench/, times LoRA and full fine-tuning only and names them by their
registry labels; it keeps no per-method list, so there is nothing in it to check here.)"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest

from tasks.cli import build_parser
from tasks.config import preset_config
from tasks.registry import METHODS

NAMES = list(METHODS)


def _subparser(parser, *path):
    for name in path:
        action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
        parser = action.choices[name]
    return parser


def _choices(parser, dest):
    return next(a for a in parser._actions if a.dest == dest).choices


@pytest.fixture(scope="module")
def all_methods_config(imdb_dir):
    """A config that runs every registered method."""
    return preset_config("smoke", data=str(imdb_dir), methods=NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_config_and_its_variants_know_the_method(name, all_methods_config):
    config = preset_config("smoke", data="x", methods=[name])
    assert config.methods == (name,)
    variants = config.variants()
    assert variants and {v.method for v in variants} == {name}
    assert name in {v.method for v in all_methods_config.variants()}


@pytest.mark.parametrize("name", NAMES)
def test_the_cli_offers_the_method(name):
    parser = build_parser()
    for command in (("run",), ("step", "prepare")):
        assert name in _choices(_subparser(parser, *command), "methods"), command
    baseline = _choices(_subparser(parser, "step", "baseline"), "name")
    trained = _choices(_subparser(parser, "step", "train"), "method")
    # exactly one single-variant step runs it: `step baseline NAME` or `step train --method`
    assert (name in baseline) != (name in trained)
    assert (name in trained) == METHODS[name].trained


@pytest.mark.parametrize("name", NAMES)
def test_the_dag_form_offers_the_method(dag, name):
    param = dag.params.get_param("methods")
    assert name in param.schema["items"]["enum"]
    assert METHODS[name].description in param.description


def test_the_dag_routes_encoder_methods_to_the_gpu_plan_and_the_others_to_the_cpu_plan(
        dag, artifacts, imdb_dir, monkeypatch):
    """The prepare task's own code, with every method asked for in the run conf."""
    prepare = dag.get_task("prepare").python_callable
    context = {"params": {"preset": "smoke", "data": str(imdb_dir), "methods": NAMES},
               "run_id": "manual__2026-11-29T05:00:00+00:00",
               "ti": SimpleNamespace(try_number=1)}
    monkeypatch.setitem(prepare.__globals__, "get_current_context", lambda: context)
    plan = prepare()
    config = preset_config("smoke", data=str(imdb_dir), methods=NAMES)
    names = {kind: [v["name"] for v in plan[kind]] for kind in ("cpu", "gpu")}
    assert sorted(names["cpu"] + names["gpu"]) == sorted(v.name for v in config.variants())
    for kind, encoder in (("gpu", True), ("cpu", False)):
        methods = {v["method"] for v in plan[kind]}
        assert methods == {m.name for m in METHODS.values() if m.uses_encoder == encoder}, kind
    assert plan["run_dir"] == str(artifacts / "runs" / context["run_id"])


def test_the_variant_tasks_read_back_what_the_plan_holds(all_methods_config):
    from tasks.registry import Variant

    for v in all_methods_config.variants():
        assert Variant.from_dict(v.to_dict()) == v  # XCom carries the dict


def _members(protocol: type) -> set[str]:
    """The functions a protocol of tasks.job asks for, its bases' included."""
    return {n for cls in protocol.__mro__ if cls.__module__ == "tasks.job"
            for n, v in vars(cls).items() if callable(v) and not n.startswith("_")}


@pytest.mark.parametrize("name", NAMES)
def test_the_method_has_its_module(name):
    from tasks.job import Baseline, MergeableMethod, TrainedMethod

    method = METHODS[name]
    module = importlib.import_module(method.module)
    contract = (MergeableMethod if method.mergeable else TrainedMethod) if method.trained \
        else Baseline
    needs = _members(contract)
    assert needs >= ({"make_trainable", "save"} if method.trained else {"predict"})
    assert needs >= ({"merge", "bare"} if method.mergeable else set())
    assert all(callable(getattr(module, f, None)) for f in needs), (name, needs)
    if method.trained:  # its learning rates are a config field (a sweep dimension)
        assert isinstance(getattr(preset_config("smoke"), method.lr_field), tuple)


def test_the_report_has_every_methods_label_and_colour(tmp_path):
    from tasks.report import build_report, plots
    from tests.tasks.fixtures_report import make_run

    report = build_report(make_run(tmp_path).run_dir, tmp_path / "reports")
    pages = (report.read_text(), (report.parent.parent / "index.html").read_text())
    for m in METHODS.values():
        assert plots.method_color(m.name) == m.color
        assert plots.method_label(m.name) == m.label
        for page in pages:  # the dots of every table and legend take their colour from here
            assert f".m-{m.name} {{ background: {m.color}; }}" in page


@pytest.mark.parametrize("name", NAMES)
def test_the_report_labels_each_methods_rows(name):
    from tasks.metrics import MetricsRecord
    from tasks.report.compute import aggregate

    variant = preset_config("smoke", data="x", methods=[name]).variants()[0]
    row = aggregate([MetricsRecord.start(variant, "m", "smoke")])
    assert row["method_label"] == METHODS[name].label
    assert row["label"].startswith(METHODS[name].label)
