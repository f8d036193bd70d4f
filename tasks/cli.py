"""`loraflow`: run the whole experiment, one step, a report or the benchmark without Airflow.

    loraflow run --preset smoke --data ../shared/data/imdb
    loraflow run --preset cpu --methods lora full_finetune --lora-lr 1e-3,2e-3 --full-lr 3e-5,5e-5
    loraflow run --run-id my-run            # again: runs only what is not complete yet
    loraflow run --run-id my-run --force    # runs every variant again
    loraflow step prepare --preset cpu --run-id my-run
    loraflow step tokenize --run-dir artifacts/runs/my-run
    loraflow step baseline majority --run-dir artifacts/runs/my-run
    loraflow step train --run-dir artifacts/runs/my-run --method lora --rank 8 --targets qv
    loraflow report artifacts/runs/my-run
    loraflow presets

SIGTERM or Ctrl-C stops a run within a training step and records the variant it stopped
as failed; a full or read-only disk stops it with one line naming the path. Either way the
completed variants are kept, and the same command with the same --run-id goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tasks import registry
from tasks.config import (
    DEFAULT_PRESET,
    PRECISIONS,
    PRESETS,
    TRUNCATIONS,
    ExperimentConfig,
    parse_list,
    preset_config,
)
from tasks.failures import storage_error
from tasks.paths import InUse, exclusive
from tasks.registry import Variant
from tasks.steps import DATA_STEPS, data_step
from tasks.stop import Interrupted, stop_at_once

BASELINES = [m.name for m in registry.METHODS.values() if not m.trained]
TRAINED = [m.name for m in registry.METHODS.values() if m.trained]


def _numbers(kind: type):
    def parse(text: str) -> list:
        try:
            return parse_list("", text, kind)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


# One flag per config field, derived from the dataclass so the CLI cannot drift from it.
_FIELD_HELP = {
    "model": "hub id, local HF folder, embedded-minilm or tiny-distilbert",
    "data": "hub, an https:// URL of aclImdb_v1.tar.gz (#sha256=... unless canonical), or a "
            "local folder",
    "methods": f"which methods run (default: the preset's): {' '.join(registry.METHODS)}",
    "targets": "LoRA target sets: qkvo qv all-linear, or module names such as q_lin,v_lin",
    "lora_lr": "comma-separated learning rates for LoRA (and BitFit), e.g. 1e-3,2e-3",
    "full_lr": "comma-separated learning rates for full fine-tuning (as many as --lora-lr)",
    "ranks": "comma-separated LoRA ranks, e.g. 4,8,16",
    "seeds": "comma-separated training seeds, e.g. 1,2,3",
    "precision": "auto (bf16 where the device has it natively), fp32, bf16 or fp16 (CUDA)",
    "truncation": "what an encoder reads of a long review: head, or head_tail (first and last "
                  "tokens)",
}


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS))
    for f in dataclasses.fields(ExperimentConfig):
        if f.name == "preset":
            continue
        flag, kwargs = "--" + f.name.replace("_", "-"), {"help": _FIELD_HELP.get(f.name)}
        if f.name == "methods":
            kwargs.update(nargs="+", choices=list(registry.METHODS))
        elif f.name == "targets":
            kwargs.update(nargs="+")
        elif f.name == "precision":
            kwargs.update(choices=PRECISIONS)
        elif f.name == "truncation":
            kwargs.update(choices=TRUNCATIONS)
        elif "tuple[float" in str(f.type):
            kwargs.update(type=_numbers(float))
        elif "tuple[int" in str(f.type):
            kwargs.update(type=_numbers(int))
        elif str(f.type) in ("int", "float"):
            kwargs.update(type=int if str(f.type) == "int" else float)
        p.add_argument(flag, dest=f.name, **kwargs)


FORCE_HELP = ("run complete variants again too (by default a variant whose metrics.json says "
              "ok or not applicable, with its predictions and model, is kept and skipped); a "
              "rerun that fails keeps the earlier result, its failure goes to "
              "results/<variant>/failed-attempt.json")


def _add_run_location(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", help="artifacts root (default $LORAFLOW_ARTIFACTS or ./artifacts)")
    p.add_argument("--reports", help="reports folder (default $LORAFLOW_REPORTS or ./reports)")
    p.add_argument("--run-id", help="run folder name (default local__<UTC time>_<random>)")


def _config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    fields = [f.name for f in dataclasses.fields(ExperimentConfig) if f.name != "preset"]
    return preset_config(args.preset, **{f: getattr(args, f) for f in fields})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole chain in-process, then the report")
    _add_config_options(run)
    _add_run_location(run)
    run.add_argument("--force", action="store_true", help=FORCE_HELP)

    step = sub.add_parser("step", help="one step of a run").add_subparsers(dest="step",
                                                                         required=True)
    prepare = step.add_parser("prepare", help="create a run folder from a preset + overrides")
    _add_config_options(prepare)
    _add_run_location(prepare)
    for name in [s.name for s in DATA_STEPS] + ["report"]:
        step.add_parser(name, help=f"the {name} step of a prepared run")
    baseline = step.add_parser("baseline", help="one baseline of a prepared run")
    baseline.add_argument("name", choices=BASELINES)
    train = step.add_parser("train", help="one trained variant of a prepared run; the sweep "
                            "values default to the run config's first ones")
    train.add_argument("--method", choices=TRAINED, default="lora")
    train.add_argument("--rank", type=int)
    train.add_argument("--targets", help="one target set, e.g. qv or q_lin,v_lin")
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int)
    for p in (baseline, train):
        p.add_argument("--force", action="store_true", help=FORCE_HELP)
    for name, p in step.choices.items():
        if name != "prepare":
            p.add_argument("--run-dir", required=True, help="a folder made by `step prepare`")
            p.add_argument("--reports", help="reports folder (default $LORAFLOW_REPORTS)")

    report = sub.add_parser("report", help="rebuild the report of a run folder")
    report.add_argument("run_dir")
    report.add_argument("--reports", help="reports folder")

    bench = sub.add_parser("bench", help="run the benchmark (bench/)")
    bench.add_argument("--quick", action="store_true", help="tiny model and data: seconds")
    bench.add_argument("--out", default="bench/results")
    bench.add_argument("--data", help="IMDB folder with train/test.parquet (default $LORAFLOW_DATA)")
    bench.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    bench.add_argument("--sweep", action="store_true", help="N LoRA variants one at a time vs "
                       "k at once on one device, and full fine-tuning at the paper shape "
                       "(bench/sweep.py: sweep.json, sweep.md)")
    bench.add_argument("--k", type=int, help="with --sweep: variants at once (default: auto on "
                       "CUDA, 2 on the CPU)")

    sub.add_parser("presets", help="list the presets and the methods")
    return parser


def _run(args) -> int:
    from tasks.paths import exclusive
    from tasks.pipeline import new_run_id, prepare_run, run_all

    config = _config_from_args(args)
    args.run_id = args.run_id or new_run_id()  # known from here on: a stop message names it
    paths = prepare_run(config, args.run_id, args.artifacts, args.reports)
    started = time.time()
    with exclusive(paths.run_dir / ".lock", f"run {paths.run_id}"):
        kept = [] if args.force else _complete_variants(config, paths)
        report = run_all(config, paths, force=args.force)
    failed = _failed_variants(paths.results_dir, started)
    if failed:
        print(f"warning: {len(failed)} variant(s) failed: {', '.join(failed)} (see the report)",
              file=sys.stderr)
    if kept:
        print(f"kept: {len(kept)} variant(s) complete from before, not run again (--force runs "
              "them again)")
    print(f"run: {paths.run_dir}")
    print(f"report: {report}")
    return 1 if failed else 0


def _complete_variants(config: ExperimentConfig, paths) -> list[str]:
    from tasks.variants import complete

    return [v.name for v in config.variants()
            if complete(v, registry.method(v.method), paths) is not None]


def _failed_variants(results: Path, since: float) -> list[str]:
    """The variants whose record says they failed, and those whose forced rerun failed
    after `since` (their earlier result is kept: tasks.variants)."""
    from tasks.variants import FAILED_ATTEMPT

    out = []
    for metrics in sorted(results.glob("*/metrics.json")):
        if json.loads(metrics.read_text()).get("status") not in ("ok", "not_applicable"):
            out.append(metrics.parent.name)
        elif (attempt := metrics.parent / FAILED_ATTEMPT).exists() and \
                attempt.stat().st_mtime >= since:
            out.append(f"{metrics.parent.name} (its rerun; the earlier result is kept)")
    return out


def train_variant_from_args(args: argparse.Namespace, config: ExperimentConfig) -> Variant:
    """The variant `step train` asks for: given flags, else the run config's first values;
    a flag the method has no dimension for is refused."""
    method = registry.method(args.method)
    given = {"rank": args.rank, "targets": args.targets, "lr": args.lr, "seed": args.seed}
    stray = [k for k, v in given.items() if v is not None and k not in method.dims]
    if stray:
        raise ValueError(f"--{', --'.join(stray)} does not apply to {method.name} (its "
                         f"dimensions are {', '.join(method.dims)})")
    first: dict[str, Any] = {"rank": config.ranks[0], "targets": config.targets[0],
                             "seed": config.seeds[0],
                             "lr": getattr(config, method.lr_field)[0]}
    return Variant(method.name, **{d: given[d] if given[d] is not None else first[d]
                                   for d in method.dims})


def _step(args) -> int:
    from tasks import pipeline

    if args.step == "prepare":
        paths = pipeline.prepare_run(_config_from_args(args), args.run_id or pipeline.new_run_id(),
                                     args.artifacts, args.reports)
        print(f"run: {paths.run_dir}")
        return 0
    config, paths = pipeline.load_run(args.run_dir, args.reports)
    with exclusive(paths.run_dir / ".lock", f"run {paths.run_id}"):
        return _one_step(args, config, paths)


def _one_step(args, config: ExperimentConfig, paths) -> int:
    if args.step in {s.name for s in DATA_STEPS}:
        print(data_step(args.step).function()(config, paths))
    elif args.step == "report":
        from tasks.report import build_report

        print(f"report: {build_report(paths.run_dir, paths.reports)}")
    else:
        from tasks.variants import run_variant

        variant = (Variant(args.name) if args.step == "baseline"
                   else train_variant_from_args(args, config))
        print(run_variant(variant, config, paths, force=args.force))
    return 0


def _allow_the_given_folder(args: argparse.Namespace) -> None:
    """`--data FOLDER` on the command line is allowed wherever it is: the data roots
    (tasks.sources.data_roots) guard what a trigger form may name, not what the person at
    this shell may read. So is the folder of the run a step continues (`--run-dir`), which
    `loraflow step prepare --data FOLDER` recorded. An explicit $LORAFLOW_DATA_ROOTS still
    rules."""
    from tasks.sources import data_roots

    data = getattr(args, "data", None) or _data_of_the_run(getattr(args, "run_dir", None))
    if not data or data == "hub" or "://" in data or os.environ.get("LORAFLOW_DATA_ROOTS"):
        return
    folder = Path(data).expanduser().resolve()
    os.environ["LORAFLOW_DATA_ROOTS"] = os.pathsep.join(map(str, [*data_roots(), folder]))


def _data_of_the_run(run_dir: str | None) -> str | None:
    """The data source recorded in a prepared run's config.json; None without one (the
    step then says that prepare has not run)."""
    from tasks.paths import RunPaths, read_json

    if not run_dir:
        return None
    try:
        data = read_json(RunPaths.from_run_dir(run_dir).config_json).get("data")
    except (OSError, ValueError, AttributeError):
        return None
    return data if isinstance(data, str) else None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _allow_the_given_folder(args)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with stop_at_once():  # SIGTERM, Ctrl-C: Interrupted, answered below (tasks.stop)
            return _command(args)
    except (Interrupted, KeyboardInterrupt) as err:  # KeyboardInterrupt: before the handler
        name = err.signal_name if isinstance(err, Interrupted) else "SIGINT"
        print(f"loraflow: stopped by {name}{_what_is_kept(args)}", file=sys.stderr)
        return err.exit_code if isinstance(err, Interrupted) else 130
    except Exception as err:
        storage = storage_error(err)
        if storage is not None:
            print(f"loraflow: error: {storage}{_what_is_kept(args)}", file=sys.stderr)
            return 1
        if isinstance(err, (ValueError, FileNotFoundError, InUse)):
            print(f"loraflow: error: {err}", file=sys.stderr)
            return 2
        raise


def _what_is_kept(args: argparse.Namespace) -> str:
    """What a stopped run or step leaves behind, and how to go on from it."""
    if args.command == "run" and args.run_id:
        return (f"; completed variants are kept: `loraflow run --run-id {args.run_id}` with the "
                "same settings goes on from them")
    return "; completed variants are kept" if args.command == "step" else ""


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "step":
        return _step(args)
    if args.command == "report":
        from tasks.report import build_report

        print(f"report: {build_report(Path(args.run_dir), args.reports)}")
        return 0
    if args.command == "bench":
        from tasks.paths import PROJECT_DIR

        sys.path.insert(0, str(PROJECT_DIR))  # bench/ lives beside the packages, not in them
        if args.sweep:
            from bench.sweep import main as bench_main
        elif args.k is not None:
            raise ValueError("--k applies to --sweep only")
        else:
            from bench.run import main as bench_main

        return bench_main(["--quick"] * args.quick + ["--out", args.out, "--device", args.device]
                          + ["--data", args.data] * bool(args.data)
                          + ["--k", str(args.k)] * (args.k is not None))
    for name in PRESETS:
        print(f"{name:6} " + json.dumps(preset_config(name).to_dict()))
    print("methods: " + ", ".join(f"{m.name} ({m.kind})" for m in registry.METHODS.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
