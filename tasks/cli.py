"""`loraflow`: run the whole experiment, one step, a report or the benchmark without Airflow.

    loraflow run --preset smoke --data ../shared/data/imdb
    loraflow step tokenize --run-dir artifacts/runs/<run_id>
    loraflow step train --run-dir ... --method lora --rank 8 --targets qv --seed 1
    loraflow report artifacts/runs/<run_id>
    loraflow presets
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from tasks.config import BASELINES, PRESETS, preset_config

STEPS = ("prepare", "download", "validate", "tokenize", "baseline", "train", "report")


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _add_config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="smoke", choices=sorted(PRESETS))
    p.add_argument("--model", help="hub id, local HF folder, embedded-minilm or tiny-distilbert")
    p.add_argument("--data", help="hub, an https:// URL of aclImdb_v1.tar.gz, or a local folder")
    p.add_argument("--artifacts", help="artifacts root (default $LORAFLOW_ARTIFACTS or ./artifacts)")
    p.add_argument("--reports", help="reports folder (default $LORAFLOW_REPORTS or ./reports)")
    p.add_argument("--run-id", help="run folder name (default local__<UTC time>)")
    p.add_argument("--train-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lora-lr", type=float)
    p.add_argument("--full-lr", type=float)
    p.add_argument("--ranks", type=_int_list, help="comma-separated, e.g. 4,8,16")
    p.add_argument("--targets", nargs="+", help="target sets: qkvo qv all-linear or q_lin,v_lin")
    p.add_argument("--seeds", type=_int_list, help="comma-separated, e.g. 1,2,3")
    p.add_argument("--baselines", nargs="*", choices=BASELINES)
    p.add_argument("--no-full-finetune", dest="full_finetune", action="store_false", default=None)


def _config_from_args(args: argparse.Namespace):
    fields = ("model", "data", "train_size", "test_size", "max_length", "epochs", "batch_size",
              "lora_lr", "full_lr", "ranks", "targets", "seeds", "baselines", "full_finetune")
    return preset_config(args.preset, **{f: getattr(args, f) for f in fields})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the whole chain in-process, then the report")
    _add_config_options(run)

    step = sub.add_parser("step", help="one step of a run")
    step.add_argument("step", choices=STEPS)
    step.add_argument("name", nargs="?", help="baseline name (step baseline)")
    step.add_argument("--run-dir", help="an existing run folder (every step but prepare)")
    step.add_argument("--method", choices=("lora", "full_finetune", "linear_probe"), default="lora")
    step.add_argument("--rank", type=int)
    step.add_argument("--seed", type=int)
    step.add_argument("--target-set", dest="target_set", help="train: target set of this variant")
    _add_config_options(step)

    report = sub.add_parser("report", help="rebuild the report of a run folder")
    report.add_argument("run_dir")
    report.add_argument("--reports", help="reports folder")

    bench = sub.add_parser("bench", help="run the benchmark (bench/)")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--out", default="bench/results")

    sub.add_parser("presets", help="list the presets")
    return parser


def _run(args) -> int:
    from tasks.pipeline import new_run_id, prepare_run, run_all

    config = _config_from_args(args)
    paths = prepare_run(config, args.run_id or new_run_id(), args.artifacts, args.reports)
    report = run_all(config, paths)
    failed = _failed_variants(paths.results_dir)
    if failed:
        print(f"warning: {len(failed)} variant(s) failed: {', '.join(failed)} (see the report)", file=sys.stderr)
    print(f"run: {paths.run_dir}")
    print(f"report: {report}")
    return 1 if failed else 0


def _failed_variants(results: Path) -> list[str]:
    out = []
    for metrics in sorted(results.glob("*/metrics.json")):
        if json.loads(metrics.read_text()).get("status") != "ok":
            out.append(metrics.parent.name)
    return out


def _step(args) -> int:
    from tasks import pipeline

    if args.step == "prepare":
        paths = pipeline.prepare_run(_config_from_args(args), args.run_id or pipeline.new_run_id(),
                                     args.artifacts, args.reports)
        print(f"run: {paths.run_dir}")
        return 0
    if not args.run_dir:
        raise ValueError(f"step {args.step} needs --run-dir (a folder made by `loraflow step prepare`)")
    config, paths = pipeline.load_run(args.run_dir, args.reports)
    if args.step == "download":
        from tasks.data import download_dataset as fn
        out = fn(config, paths)
    elif args.step == "validate":
        from tasks.validate import validate_dataset as fn
        out = fn(config, paths)
    elif args.step == "tokenize":
        from tasks.tokenize import tokenize_dataset as fn
        out = fn(config, paths)
    elif args.step == "baseline":
        from tasks.baselines import run_baseline
        if not args.name:
            raise ValueError(f"step baseline needs a name: one of {', '.join(BASELINES)}")
        out = run_baseline(args.name, config, paths)
    elif args.step == "train":
        from tasks.train import train_variant
        spec = {"method": args.method, "seed": config.seeds[0] if args.seed is None else args.seed}
        if args.method == "lora":
            spec.update(rank=args.rank or config.ranks[0], targets=args.target_set or config.targets[0])
        out = train_variant(spec, config, paths)
    else:
        from tasks.report import build_report
        out = build_report(paths.run_dir, paths.reports)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
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
            from bench.run import main as bench_main
            return bench_main(["--quick"] * args.quick + ["--out", args.out])
        for name, preset in PRESETS.items():
            print(f"{name:6} " + json.dumps(preset))
        return 0
    except (ValueError, FileNotFoundError) as err:
        print(f"loraflow: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
