"""Provenance that survives a deployment (tasks/provenance.py): the commit from git, else
from the image's build argument; each variant's torch, CUDA and transformers versions,
device name, host, precision and the model's weights hash, in its metrics.json."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import transformers

from tasks import provenance
from tasks.environment import environment
from tasks.metrics import MetricsRecord
from tasks.paths import PROJECT_DIR
from tasks.registry import Variant
from tasks.variants import run_variant


def test_the_commit_comes_from_git_in_a_checkout(monkeypatch):
    monkeypatch.setenv("LORAFLOW_COMMIT", "baked-in")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True,
                          text=True, check=True).stdout.strip()
    assert provenance.git_commit().startswith(head)


def test_without_git_the_commit_comes_from_the_environment(tmp_path, monkeypatch):
    """As in the Docker image: no git binary, no .git, LORAFLOW_COMMIT from the build arg."""
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the PATH
    monkeypatch.setenv("LORAFLOW_COMMIT", "0123abcd")
    assert provenance.git_commit(tmp_path) == "0123abcd (image build)"
    assert environment.__wrapped__()["git_commit"] == "0123abcd (image build)"
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # git, but the folder is no checkout
    assert provenance.git_commit(tmp_path) == "0123abcd (image build)"
    monkeypatch.delenv("LORAFLOW_COMMIT")
    assert provenance.git_commit(tmp_path) == "unknown"


def test_variant_provenance_names_versions_device_host_and_precision():
    provenance._stack.cache_clear()
    p = provenance.variant_provenance("cpu", "bf16", "tiny-distilbert")
    assert (p["torch"], p["transformers"]) == (torch.__version__, transformers.__version__)
    assert p["cuda"] == (torch.version.cuda or "none (CPU build)")
    assert (p["device"], p["host"], p["precision"]) == ("cpu", platform.node(), "bf16")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), None)
    assert p["device_name"] == cpu and cpu
    assert p["model_weights"].startswith("random init")


def test_model_weights_hash_the_weight_files(tmp_path):
    minilm = provenance.model_weights("embedded-minilm")
    assert minilm.startswith("sha256:") and len(minilm) == len("sha256:") + 64
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights one")
    first = provenance.model_weights.__wrapped__(str(folder))
    (folder / "model.safetensors").write_bytes(b"weights two")
    assert provenance.model_weights.__wrapped__(str(folder)) != first
    (folder / "model.safetensors").unlink()
    assert provenance.model_weights.__wrapped__(str(folder)).startswith("unknown")


def test_a_variants_metrics_json_records_where_it_ran(run, monkeypatch):
    monkeypatch.setenv("LORAFLOW_COMMIT", "not used: git is there")
    from tasks.tokenize import tokenize_dataset

    config, paths = run
    tokenize_dataset(config, paths)
    from tasks.evaluate import resolve_precision

    # the notebook heuristic runs at the run's precision, resolved once for the variant
    for name, precision, weights in (("majority", "n/a (no encoder)", None),
                                     ("seed_heuristic", resolve_precision(config.precision, "cpu"),
                                      "random init")):
        record = MetricsRecord.read(run_variant(Variant(name), config, paths, device="cpu"))
        p = record.provenance
        assert record.status == "ok" and p["precision"] == precision, name
        assert p["torch"] == torch.__version__ and p["transformers"] == transformers.__version__
        assert p["device"] == "cpu" and p["device_name"] and p["host"] == platform.node()
        assert p["git_commit"] == provenance.git_commit()
        if weights:
            assert p["model_weights"].startswith(weights)
        else:  # majority never loads the model
            assert p["model_weights"] is None


def test_a_baseline_names_the_stack_without_importing_torch():
    """A baseline's task process records torch's and transformers' versions as an encoder
    variant does, without the seconds of importing them."""
    code = ("import sys, json; from tasks import provenance; "
            "p = provenance.variant_provenance('cpu', None); "
            "print(json.dumps([p['torch'], p['cuda'], p['transformers'], "
            "'torch' in sys.modules, 'transformers' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2]).stdout
    assert json.loads(out) == [torch.__version__, torch.version.cuda or "none (CPU build)",
                               transformers.__version__, False, False]
