"""Sweep benchmark: N LoRA variants through the real `run_variant` path on one device, one
at a time against k at once, and full fine-tuning at the `paper` shape. Writes sweep.json
and sweep.md into --out.

    loraflow bench --sweep --device cuda --out bench/results/gpu   # 8 variants, k = auto
    loraflow bench --sweep --quick --out /tmp/s                    # tiny model: seconds

Each variant is a process of its own, as an Airflow task is: it takes its GPU lease (k
slots per device, tasks/gpu.py), loads the model, trains, evaluates, saves and writes
metrics.json. Processes fork from a server that has imported the libraries (a fork server
on CUDA, so that no child inherits CUDA state; this process itself on the CPU, where it has
run no torch operation by then), so neither arm pays the import of torch per variant. Both
arms train the same variants on the same rows; the second arm's accuracies are compared
with the first's.

The `paper` shape: DistilBERT-base dimensions (random weights: step time does not depend
on weight values), batch 16 x 512 tokens of real reviews that fill all 512, the training
loop's own step (tasks.train: fused AdamW and TF32 on CUDA), fp32 and bf16 autocast, under
a whole-device lease.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PAPER_BATCH, PAPER_SEQ = 16, 512
PAPER_STEPS = {"full": (3, 10), "quick": (1, 2)}  # (untimed warm-up, timed) steps
PRELOAD = ["torch", "transformers", "tasks.variants", "tasks.train", "tasks.methods.lora",
           "lora_core.inject"]


# --- the sweep ------------------------------------------------------------------------------

def sweep_config(data: str, quick: bool):
    """2 ranks x 2 learning rates x 2 seeds of LoRA on the `cpu` preset (quick: 2 learning
    rates of one rank and seed on the tiny random model)."""
    from tasks.config import preset_config

    if quick:
        return preset_config("smoke", data=data, methods=("lora",), train_size=64, val_size=32,
                             test_size=32, max_length=32, ranks=(4,), lora_lr=(1e-3, 2e-3),
                             full_lr=(5e-5, 1e-4), seeds=(42,))
    return preset_config("cpu", data=data, methods=("lora",), ranks=(8, 16),
                         lora_lr=(1e-3, 2e-3), full_lr=(5e-5, 1e-4), seeds=(42, 43))


def prepare(config, root: Path, run_id: str):
    """A run folder with its data subsets and tokens (the steps before the variants)."""
    from tasks.data import download_dataset
    from tasks.pipeline import prepare_run
    from tasks.tokenize import tokenize_dataset

    paths = prepare_run(config, run_id, root, root / "reports")
    download_dataset(config, paths)
    tokenize_dataset(config, paths)
    return paths


def child_env(device: str, k: int, root: Path) -> dict[str, str]:
    """What a variant's process sees: the lease's k, the one device of the sweep, and the
    sweep's own artifacts root (its locks and results)."""
    env = {"LORAFLOW_TASKS_PER_GPU": str(k), "LORAFLOW_PROGRESS": "0",
           "LORAFLOW_ARTIFACTS": str(root)}
    if device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = device.partition(":")[2] or "0"
    else:
        env["LORAFLOW_DEVICE"] = "cpu"
    return env


def _child(run_dir: str, variant: dict[str, Any], env: dict[str, str], threads: int) -> None:
    """One variant, as a task process runs it (lease included)."""
    os.environ.update(env)  # before anything touches CUDA: CUDA_VISIBLE_DEVICES is read once
    import torch

    from tasks.pipeline import load_run
    from tasks.registry import Variant
    from tasks.variants import run_variant

    torch.set_num_threads(threads)
    config, paths = load_run(run_dir)
    run_variant(Variant(**variant), config, paths)


def run_arm(paths, variants: list, k: int, device: str, ctx) -> dict[str, Any]:
    """Every variant in a process of its own, at most k at once; wall time of the arm.
    Processes start as slots free up, as Celery hands a worker its next task."""
    import torch

    # k processes share this process's threads (as `make cluster` shares the cores between
    # its workers): oversubscribed OpenMP threads spin against each other
    threads = max(1, torch.get_num_threads() // k)
    env = child_env(device, k, paths.artifacts)
    pending = [{"method": v.method, "rank": v.rank, "targets": v.targets, "lr": v.lr,
                "seed": v.seed} for v in variants]
    running: list[tuple[Any, float, dict]] = []
    spans: list[dict[str, Any]] = []
    start = time.perf_counter()
    while pending or running:
        while pending and len(running) < k:
            variant = pending.pop(0)
            proc = ctx.Process(target=_child, args=(str(paths.run_dir), variant, env, threads))
            proc.start()
            running.append((proc, time.perf_counter(), variant))
        time.sleep(0.05)
        for item in [r for r in running if not r[0].is_alive()]:
            proc, began, variant = item
            proc.join()
            running.remove(item)
            spans.append({"variant": variant, "exitcode": proc.exitcode,
                          "start_s": began - start, "end_s": time.perf_counter() - start})
    return {"k": k, "wall_seconds": time.perf_counter() - start, "threads": threads,
            "processes": spans}


def lora_step_flops(params: int, trainable: int, tokens: float) -> float:
    """Model FLOPs of a LoRA step: forward 2 x params per token, backward 2 x params (the
    activations' gradients pass through every frozen matrix) plus 2 x trainable (their
    weight gradients); 6 x params for full fine-tuning, as bench/flops.py counts it."""
    return (4 * params + 2 * trainable) * tokens


def variant_rows(paths, config) -> list[dict[str, Any]]:
    """What each variant recorded, with its real tokens per step and model TFLOP/s."""
    from tasks.tokenize import load_split

    tokens = float(load_split(paths, "train")["length"].sum()) * config.epochs
    rows = []
    for metrics in sorted(paths.results_dir.glob("*/metrics.json")):
        m = json.loads(metrics.read_text())
        row = {k: m.get(k) for k in ("variant", "status", "validation_accuracy", "accuracy",
                                      "train_seconds", "train_steps", "seconds_per_step",
                                      "params_total", "params_trainable", "peak_memory_bytes",
                                      "peak_memory_kind", "precision", "device")}
        if m.get("status") == "ok" and m.get("train_steps"):
            row["tokens_per_step"] = tokens / m["train_steps"]
            row["step_flops"] = lora_step_flops(m["params_total"], m["params_trainable"],
                                                row["tokens_per_step"])
            row["step_tflops"] = row["step_flops"] / m["seconds_per_step"] / 1e12
        rows.append(row)
    return rows


def summarise(arm: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    flops = sum(r["step_flops"] * r["train_steps"] for r in ok)
    return {**arm, "variants": len(arm["processes"]), "ok": len(ok),
            "variants_per_hour": 3600 * len(ok) / arm["wall_seconds"],
            "median_seconds_per_step": statistics.median(r["seconds_per_step"] for r in ok) if ok else None,
            "median_step_tflops": statistics.median(r["step_tflops"] for r in ok) if ok else None,
            "device_tflops": flops / arm["wall_seconds"] / 1e12, "rows": rows}


def start_method(device: str) -> str:
    """CUDA state must not cross a fork: on CUDA, children fork from a server process that
    never touches it; on the CPU, from this process (no torch operation has run here yet)."""
    return "forkserver" if device.startswith("cuda") else "fork"


def bench_sweep(data: str, quick: bool, device: str, k: int, root: Path) -> dict[str, Any]:
    config = sweep_config(data, quick)
    variants = config.variants()
    runs = {"one_at_a_time": prepare(config, root, "sweep-one-at-a-time"),
            "k_at_once": prepare(config, root, "sweep-k-at-once")}
    # a fork server boots once with the libraries imported, before any clock starts
    ctx = multiprocessing.get_context(start_method(device))
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
        warm = ctx.Process(target=int)
        warm.start()
        warm.join()
    arms = {}
    for name, width in (("one_at_a_time", 1), ("k_at_once", k)):
        arm = run_arm(runs[name], variants, width, device, ctx)
        arms[name] = summarise(arm, variant_rows(runs[name], config))
    first = {r["variant"]: r for r in arms["one_at_a_time"]["rows"]}
    diffs = [abs(r["validation_accuracy"] - first[r["variant"]]["validation_accuracy"])
             for r in arms["k_at_once"]["rows"]
             if r["status"] == "ok" and first.get(r["variant"], {}).get("status") == "ok"]
    return {"config": config.to_dict(), "variants": [v.name for v in variants], "arms": arms,
            "speedup": arms["one_at_a_time"]["wall_seconds"] / arms["k_at_once"]["wall_seconds"],
            "validation_accuracy_max_abs_difference": max(diffs) if diffs else None,
            "compared_variants": len(diffs)}


# --- full fine-tuning at the paper shape ------------------------------------------------------

def long_reviews(data_dir: Path, n: int, seq: int) -> dict[str, Any]:
    """n test reviews that fill all `seq` tokens (truncated there): no padding in the batch."""
    import pandas as pd

    from tasks.models import load_tokenizer

    texts = pd.read_parquet(data_dir / "test.parquet", columns=["text"])["text"]
    # about 4 characters a token: reviews over 6 x seq characters nearly all fill seq tokens
    texts = texts[texts.str.len() > 6 * seq].sample(frac=1.0, random_state=0).tolist()
    tok = load_tokenizer("embedded-minilm")
    enc = tok(texts[: 4 * n], truncation=True, max_length=seq, padding="max_length",
              return_tensors="pt")
    full = enc["attention_mask"].sum(dim=1) == seq
    if int(full.sum()) < n:
        raise ValueError(f"fewer than {n} reviews of {seq} tokens in {data_dir}/test.parquet")
    return {"input_ids": enc["input_ids"][full][:n], "attention_mask": enc["attention_mask"][full][:n]}


def time_full_step(source: str, batch: dict[str, Any], dev: str, dtype, warmup: int,
                   timed: int) -> tuple[float, int]:
    """Seconds per full fine-tuning step (the loop's step, pipelined: one sync after the
    timed steps) and the model's parameter count."""
    import torch

    from bench.common import load_model
    from tasks.evaluate import autocast
    from tasks.train import optimizer_options, to_device

    torch.manual_seed(0)
    model = load_model(source).requires_grad_(True).train().to(dev)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, **optimizer_options(dev))
    ids, mask = to_device(batch["input_ids"], dev), to_device(batch["attention_mask"], dev)
    labels = to_device(torch.zeros(len(ids), dtype=torch.long), dev)
    cuda = dev.startswith("cuda")

    def step() -> None:
        with autocast(dev, dtype):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(timed):
        step()
    if cuda:
        torch.cuda.synchronize(dev)
    seconds = (time.perf_counter() - start) / timed
    return seconds, sum(p.numel() for p in model.parameters())


def paper_step_rows(data_dir: Path, quick: bool, device: str) -> list[dict[str, Any]]:
    """ms per full fine-tuning step at 16 x 512, fp32 and bf16, the loop's own step."""
    import torch

    from bench.flops import achieved_tflops, peak_bf16_tflops
    from tasks.evaluate import precision_label
    from tasks.gpu import gpu_lease
    from tasks.train import use_tf32

    mode = "quick" if quick else "full"
    warmup, timed = PAPER_STEPS[mode]
    source = "tiny-distilbert" if quick else "distilbert-base-dims"
    batch = long_reviews(data_dir, PAPER_BATCH, PAPER_SEQ)
    cuda = device.startswith("cuda")
    env = {} if cuda else {"LORAFLOW_DEVICE": "cpu"}
    os.environ.update(env)
    rows = []
    with gpu_lease(whole_device=True) as leased:  # nothing else on the device meanwhile
        dev = leased if cuda else "cpu"
        tf32 = use_tf32(dev)
        for dtype in (None, torch.bfloat16):
            seconds, n_params = time_full_step(source, batch, dev, dtype, warmup, timed)
            if cuda:
                torch.cuda.empty_cache()  # the model of this precision is gone
            tokens = int(batch["attention_mask"].sum())
            tflops = achieved_tflops(n_params, tokens, seconds)
            peak = peak_bf16_tflops(torch.cuda.get_device_name(dev)) if cuda else None
            label = precision_label(dtype)
            rows.append({"model": source, "precision": "tf32" if (label == "fp32" and tf32) else label,
                         "batch": PAPER_BATCH, "seq_len": PAPER_SEQ, "tokens_per_step": tokens,
                         "params_total": n_params, "steps_timed": timed,
                         "ms_per_step": 1000 * seconds, "tflops": tflops,
                         "peak_card": peak[0] if peak else None,
                         "peak_tflops": peak[1] if peak else None,
                         "share_of_peak": tflops / peak[1] if peak else None})
    return rows


# --- report -----------------------------------------------------------------------------------

def markdown(results: dict[str, Any]) -> str:
    s, m = results["sweep"], results["machine"]
    c = s["config"]
    arms = s["arms"]
    lines = [f"# Sweep benchmark ({m['when']})", "",
             f"Device {m['device']} ({m['device_name'] or 'CPU'}), {m['cores']} cores; torch "
             f"{m['torch']}, transformers {m['transformers']}. Mode: {results['mode']}.", "",
             f"## {len(s['variants'])} LoRA variants on one device, one at a time vs "
             f"{arms['k_at_once']['k']} at once", "",
             f"{c['model']}, train {c['train_size']:,} / validation {c['val_size']:,} / test "
             f"{c['test_size']:,} rows, max length {c['max_length']}, {c['epochs']} epoch(s), "
             f"batch {c['batch_size']}; ranks {c['ranks']}, learning rates {c['lora_lr']}, seeds "
             f"{c['seeds']}. Every variant is a process running `run_variant` (GPU lease, model "
             "loading, training, validation per epoch, saving, latency, test scoring). "
             "TFLOP/s: model FLOPs of a LoRA step ((4 x parameters + 2 x trainable) x real "
             "tokens) over the recorded seconds per step; device TFLOP/s: every variant's "
             "training FLOPs over the arm's wall time.", "",
             "| arm | k | wall s | variants/hour | speed-up | ok | median ms/step | "
             "median step TFLOP/s | device TFLOP/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    base = arms["one_at_a_time"]["wall_seconds"]
    for name, a in arms.items():
        ms = f"{1000 * a['median_seconds_per_step']:.1f}" if a["median_seconds_per_step"] else "-"
        tf = f"{a['median_step_tflops']:.3g}" if a["median_step_tflops"] is not None else "-"
        lines.append(f"| {name.replace('_', ' ')} | {a['k']} | {a['wall_seconds']:.1f} | "
                     f"{a['variants_per_hour']:.0f} | {base / a['wall_seconds']:.2f}x | "
                     f"{a['ok']}/{a['variants']} | {ms} | {tf} | {a['device_tflops']:.3g} |")
    diff = s["validation_accuracy_max_abs_difference"]
    lines += ["", f"Validation accuracy, k at once against one at a time, over "
              f"{s['compared_variants']} variants: largest difference "
              f"{'-' if diff is None else f'{diff:.4f}'}.", "",
              "| variant | validation acc. (1 at a time) | validation acc. (k at once) | "
              "ms/step (1) | ms/step (k) |", "| --- | ---: | ---: | ---: | ---: |"]
    second = {r["variant"]: r for r in arms["k_at_once"]["rows"]}
    for r in arms["one_at_a_time"]["rows"]:
        o = second.get(r["variant"], {})

        def acc(x):
            return f"{x:.4f}" if x is not None else "failed"

        def ms(x):
            return f"{1000 * x:.1f}" if x else "-"

        lines.append(f"| {r['variant']} | {acc(r['validation_accuracy'])} | "
                     f"{acc(o.get('validation_accuracy'))} | {ms(r['seconds_per_step'])} | "
                     f"{ms(o.get('seconds_per_step'))} |")
    lines += ["", f"## Full fine-tuning at the `paper` shape ({PAPER_BATCH} x {PAPER_SEQ})", "",
              "The training loop's step (fused AdamW and TF32 matmuls on CUDA), on reviews that "
              "fill all 512 tokens, under a whole-device lease; achieved = 6 x parameters x "
              "tokens / step time; peak = the card's dense bf16 datasheet figure.", "",
              "| model | precision | ms/step | achieved TFLOP/s | peak TFLOP/s | share of peak |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    if not results["paper_shape"]:
        lines.append("| not measured: the run ended before this part | | | | | |")
    for r in results["paper_shape"]:
        peak = f"{r['peak_tflops']:.0f} ({r['peak_card']})" if r["peak_tflops"] else "-"
        share = f"{100 * r['share_of_peak']:.1f}%" if r["share_of_peak"] is not None else "-"
        lines.append(f"| {r['model']} | {r['precision']} | {r['ms_per_step']:.1f} | "
                     f"{r['tflops']:.3g} | {peak} | {share} |")
    return "\n".join(lines) + "\n"


def default_k(device: str, n: int) -> int:
    """On CUDA: the `auto` fit for this GPU (tasks.slots), at most N; on the CPU: 2."""
    if not device.startswith("cuda"):
        return min(2, n)
    from tasks import slots

    return max(1, min(n, slots.resolve(slots.AUTO, slots.nvidia_smi_gpus())))


def main(argv: list[str] | None = None) -> int:
    from bench.common import machine

    parser = argparse.ArgumentParser(prog="loraflow bench --sweep")
    parser.add_argument("--quick", action="store_true", help="tiny random model: seconds")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--data", default=os.environ.get("LORAFLOW_DATA", "../shared/data/imdb"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    parser.add_argument("--k", type=int, help="variants at once (default: auto on CUDA, 2 on CPU)")
    args = parser.parse_args(argv)
    data_dir = Path(args.data)
    if not (data_dir / "train.parquet").exists() or not (data_dir / "test.parquet").exists():
        parser.error(f"--data {data_dir}: expected train.parquet and test.parquet there")
    if args.k is not None and args.k < 1:
        parser.error(f"--k must be >= 1, got {args.k}")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    n = len(sweep_config(str(data_dir), args.quick).variants())
    k = args.k or default_k(args.device, n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write(results: dict[str, Any]) -> None:  # after each part: a timeout keeps what ran
        (out / "sweep.json").write_text(json.dumps(results, indent=2) + "\n")
        (out / "sweep.md").write_text(markdown(results))

    saved = {name: os.environ.get(name) for name in ("LORAFLOW_ARTIFACTS", "LORAFLOW_DEVICE")}
    try:
        with tempfile.TemporaryDirectory(prefix="loraflow-sweep-") as tmp:
            os.environ["LORAFLOW_ARTIFACTS"] = tmp  # the sweep's leases and runs, no one else's
            results = {"machine": machine(args.device), "mode": "quick" if args.quick else "full",
                       "sweep": bench_sweep(str(data_dir), args.quick, args.device, k, Path(tmp)),
                       "paper_shape": []}
            write(results)
            results["paper_shape"] = paper_step_rows(data_dir, args.quick, args.device)
            write(results)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    sweep = results["sweep"]
    print(markdown(results))
    print(f"wrote {out / 'sweep.json'} and {out / 'sweep.md'}")
    failed = sum(a["variants"] - a["ok"] for a in sweep["arms"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
