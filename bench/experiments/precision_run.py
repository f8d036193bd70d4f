"""Train the trained variants of a prepared run at two precisions, then compare them
(bench/experiments/precision.py): the same drawn rows, seeds and learning rates, only
`precision` differs. For a machine where a whole `loraflow run` cannot run or would cost
too much, such as a borrowed GPU without the data-validation stack: the run's drawn
subsets travel, nothing else.

    python -m bench.experiments.precision_run artifacts/runs/cpu-lr-sweep --out /tmp/precision
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

from bench.experiments.precision import compare
from tasks import registry, tokenize
from tasks.config import ExperimentConfig
from tasks.paths import SPLITS, RunPaths, write_json
from tasks.pipeline import load_run


def clone(source: RunPaths, config: ExperimentConfig, precision: str, out: Path,
          methods: tuple[str, ...]) -> tuple[ExperimentConfig, RunPaths]:
    """A new run under `out` holding the source run's drawn subsets and its config with
    `precision` and `methods` replaced."""
    config = config.with_overrides(precision=precision, methods=methods)
    paths = RunPaths.for_run(f"{source.run_id}-{precision}", out, out / "reports")
    if paths.run_dir.exists():
        raise FileExistsError(f"{paths.run_dir} exists; give another --out")
    paths.data_dir.mkdir(parents=True)
    for split in SPLITS:
        shutil.copy2(source.split_parquet(split), paths.split_parquet(split))
    shutil.copy2(source.data_dir / "validation.json", paths.data_dir / "validation.json")
    write_json(paths.config_json, config.to_dict())
    return config, paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.precision_run")
    parser.add_argument("run_dir", type=Path, help="a run whose download step has finished")
    parser.add_argument("--out", type=Path, required=True, help="artifacts root for the two runs")
    parser.add_argument("--methods", nargs="+", default=["lora", "full_finetune"],
                        choices=[m.name for m in registry.METHODS.values() if m.trained])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: what is there)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from tasks.variants import run_variant

    config, source = load_run(args.run_dir)
    runs = {}
    for precision in ("fp32", "auto"):
        cfg, paths = clone(source, config, precision, args.out.resolve(), tuple(args.methods))
        tokenize.tokenize_dataset(cfg, paths)
        for variant in cfg.variants():
            run_variant(variant, cfg, paths, device=args.device)
        runs[precision] = paths.run_dir
    text = compare(runs["fp32"], runs["auto"])
    (args.out / "precision.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
