"""The experiment configuration: named presets plus per-run overrides.

One frozen `ExperimentConfig` travels through every step and is recorded with the run, so
a result can always be traced back to the settings that produced it. Standard library
only: the DAG file imports it to build its trigger form.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from typing import Any

from tasks import registry
from tasks.registry import Variant
from tasks.text import TRUNCATIONS  # noqa: F401  (the DAG's form reads it from here)

TARGET_SETS = ("qkvo", "qv", "all-linear")  # named sets; lora_core resolves them per model
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAX_VARIANTS = 500  # per run; Airflow maps at most 1,024 task instances per task
MAX_TOKENS = 512  # BERT's position embeddings
DEFAULT_PRESET = "cpu"  # the DAG form, its schedule, the CLI and `make run` alike
RANDOM_MODELS = ("tiny-distilbert",)  # random weights: runs on them check the plumbing only


def default_data_source() -> str:
    """`$LORAFLOW_DATA` (e.g. a local IMDB folder) when set, else the Hugging Face hub."""
    return os.environ.get("LORAFLOW_DATA", "hub")


@dataclass(frozen=True)
class ExperimentConfig:
    preset: str
    model: str  # hub id, local HF folder, `embedded-minilm` or `tiny-distilbert`
    data: str  # `hub`, an https:// URL of aclImdb_v1.tar.gz, or a local folder
    train_size: int
    val_size: int  # drawn from the training split, disjoint from the training subset
    test_size: int
    max_length: int  # tokens per example after truncation, special tokens included
    epochs: int
    methods: tuple[str, ...]  # registry names, run in registry order
    batch_size: int = 16
    lora_lr: tuple[float, ...] = (5e-4,)  # learning rates LoRA (and BitFit) are tuned over
    full_lr: tuple[float, ...] = (5e-5,)  # ... and full fine-tuning: as many, for fairness
    ranks: tuple[int, ...] = (16,)
    targets: tuple[str, ...] = ("qkvo",)  # a TARGET_SETS name or comma-separated module names
    seeds: tuple[int, ...] = (42,)
    precision: str = "auto"  # auto: bf16 autocast where the device has native bf16
    truncation: str = "head"  # what an encoder reads of a long review: tasks.text.cut
    lora_alpha: float = 16.0  # scaling = alpha / r, as in the seed notebook (r=16, alpha=16)
    lora_dropout: float = 0.0
    weight_decay: float = 0.01
    warmup_steps: int = 100  # capped at 10% of the run's optimizer steps (see tasks.train)
    max_grad_norm: float = 1.0
    data_seed: int = 42  # shuffle seed of the subsets (the notebook's 42)

    def __post_init__(self) -> None:
        for name, kind in _TUPLE_FIELDS.items():  # lists from JSON become tuples: hashable
            value = getattr(self, name)
            object.__setattr__(self, name, _as_tuple(name, value, kind))
        object.__setattr__(self, "targets",
                           tuple(registry.normalise_targets(t) for t in self.targets))
        _check(self)

    def with_overrides(self, **overrides: Any) -> ExperimentConfig:
        """A copy with the given fields replaced; `None` values mean "keep the preset's"."""
        _refuse_unknown(overrides)
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        _refuse_unknown(data)
        return cls(**data)

    def variants(self) -> list[Variant]:
        """Every variant this config asks for, in registry order."""
        return registry.enumerate_variants(self.methods, {
            "rank": self.ranks, "targets": self.targets, "seed": self.seeds,
            "lora_lr": self.lora_lr, "full_lr": self.full_lr})

    def method_variants(self, encoder: bool) -> list[Variant]:
        """The variants whose method does (or does not) run the encoder: the DAG routes
        the first to the GPU pool."""
        return [v for v in self.variants() if registry.method(v.method).uses_encoder == encoder]


_TUPLE_FIELDS: dict[str, type] = {"methods": str, "lora_lr": float, "full_lr": float,
                                  "ranks": int, "targets": str, "seeds": int}
# The one definition of each field's bounds: the checks below and the DAG's trigger form
# (`schema_bounds`) both read them.
BOUNDS: dict[str, tuple[type, float, float]] = {  # field: (type, min, max), inclusive
    "train_size": (int, 1, 10_000_000), "val_size": (int, 1, 10_000_000),
    "test_size": (int, 1, 10_000_000), "max_length": (int, 8, MAX_TOKENS),
    "epochs": (int, 1, 1000), "batch_size": (int, 1, 4096), "warmup_steps": (int, 0, 10**9),
    "data_seed": (int, 0, 2**32 - 1), "lora_alpha": (float, 1e-9, 1e6),
    "lora_dropout": (float, 0.0, 0.99), "weight_decay": (float, 0.0, 10.0),
    "max_grad_norm": (float, 1e-9, 1e6),
}
ITEM_BOUNDS: dict[str, tuple[int, int]] = {  # list field: (min, max) of each item, inclusive
    "ranks": (1, 1024), "seeds": (0, 2**31 - 1),
}
LR_FIELDS = ("lora_lr", "full_lr")  # learning rates lie strictly between 0 and 1


def schema_bounds(name: str) -> dict[str, float]:
    """A field's bounds as JSON-schema keywords (of the items, for a list field): what the
    DAG's trigger form declares, so the form cannot drift from the checks here."""
    if name in BOUNDS:
        _, low, high = BOUNDS[name]
        return {"minimum": low, "maximum": high}
    if name in ITEM_BOUNDS:
        low, high = ITEM_BOUNDS[name]
        return {"minimum": low, "maximum": high}
    if name in LR_FIELDS:
        return {"exclusiveMinimum": 0, "exclusiveMaximum": 1}
    raise KeyError(f"{name!r} has no numeric bounds")


# A sweep list typed as text (the trigger form, the CLI): numbers separated by commas,
# spaces or new lines, e.g. "5e-4, 2e-3". The form's schema checks the same shape.
LIST_SEPARATORS = re.compile(r"[\s,;]+")
# signs allowed, so that "-1" is refused by the bounds check, which says what the bounds are
NUMBER_PATTERN = r"[+-]?(?:[0-9]+[.]?[0-9]*|[.][0-9]+)(?:[eE][+-]?[0-9]+)?"
INTEGER_PATTERN = r"[+-]?[0-9]+"


def list_pattern(item: str) -> str:
    """A JSON-schema pattern for text that `parse_list` reads: `item`s separated by commas,
    semicolons or white space (new lines included); blank text is an empty field."""
    return rf"^[\s,;]*(?:{item}(?:[\s,;]+{item})*[\s,;]*)?$"


def parse_list(name: str, text: str, kind: type) -> list:
    """`text` as a list of `kind` (int or float): "5e-4, 2e-3" or one value per line.
    Raises a ValueError naming the field and the piece that is not a `kind`."""
    items = [t for t in LIST_SEPARATORS.split(text.strip()) if t]
    if not items:
        raise ValueError(f"{name or 'the list'} must hold at least one value, got {text!r}")
    out = []
    for item in items:
        try:
            if not re.fullmatch(INTEGER_PATTERN if kind is int else NUMBER_PATTERN, item):
                raise ValueError(item)  # what float() also takes: nan, inf, 1_000
            value = int(item) if kind is int else float(item)
        except ValueError:
            what, example = ("integer", "4, 8, 16") if kind is int else ("number", "5e-4, 2e-3")
            raise ValueError(f"{name + ': ' if name else ''}{item!r} is not a"
                             f"{'n' if kind is int else ''} {what} (give {what}s separated by "
                             f"commas or new lines, e.g. {example})") from None
        out.append(value)
    return out


def _as_tuple(name: str, value: Any, kind: type) -> tuple:
    if isinstance(value, str) and kind in (int, float):
        value = parse_list(name, value, kind)
    items = [value] if isinstance(value, (str, int, float)) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {value!r}")
    if not items:
        raise ValueError(f"{name} must list at least one value")
    for item in items:
        if not _is_a(item, kind):
            raise ValueError(f"{name} must hold {kind.__name__} values, got {item!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"{name} lists a value twice: {list(items)}")
    return tuple(float(i) if kind is float else i for i in items)


def _is_a(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # True is an int to Python, never a rank or a size here
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


def _check(c: ExperimentConfig) -> None:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ValueError(message)

    need(c.preset in PRESETS, f"unknown preset {c.preset!r}; expected one of {sorted(PRESETS)}")
    for name in ("model", "data"):
        value = getattr(c, name)
        need(isinstance(value, str) and value.strip() != "", f"{name} must be a non-empty "
             f"string, got {value!r}")
    for name, (kind, low, high) in BOUNDS.items():
        value = getattr(c, name)
        bounds = f"[{low:,}, {high:,}]" if kind is int else f"[{low:g}, {high:g}]"
        need(_is_a(value, kind) and low <= value <= high,
             f"{name} must be a{'n integer' if kind is int else ' number'} in {bounds}, "
             f"got {value!r}")
    need(c.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {c.precision!r}")
    need(c.truncation in TRUNCATIONS,
         f"truncation must be one of {TRUNCATIONS}, got {c.truncation!r}")
    for name in LR_FIELDS:
        bad = [x for x in getattr(c, name) if not 0 < x < 1]
        need(not bad, f"{name} values must lie in (0, 1), got {bad}")
    what = {"ranks": "LoRA ranks", "seeds": "seeds"}
    for name, (low, high) in ITEM_BOUNDS.items():
        bad = [x for x in getattr(c, name) if not low <= x <= high]
        need(not bad, f"{what[name]} must be integers in [{low:,}, {high:,}], got {bad}")
    for m in c.methods:
        registry.method(m)  # names the unknown one
    budgets = {m.lr_field: len(getattr(c, m.lr_field)) for m in registry.METHODS.values()
               if m.trained and m.name in c.methods}
    need(len(set(budgets.values())) <= 1,
         "every trained method gets the same tuning budget: give as many learning rates to "
         f"each ({', '.join(f'{k}: {n}' for k, n in budgets.items())})")
    n = len(c.variants())
    need(n <= MAX_VARIANTS, f"the sweep asks for {n} variants; at most {MAX_VARIANTS} per run "
         "(fewer ranks, target sets, learning rates or seeds)")


def _refuse_unknown(fields: dict[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown config fields {unknown}; known fields are {sorted(known)}")


# --- presets ------------------------------------------------------------------------------
# Field values each preset sets; `methods` defaults to the registry's per-preset defaults and
# `data` to $LORAFLOW_DATA (else the hub), both resolved when a config is made.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": dict(model="distilbert-base-uncased", train_size=5000, val_size=500,
                 test_size=1000, max_length=128, epochs=2),
    # Every distinct review of IMDB (tasks.data deduplicates before drawing): the training
    # split has 24,902 (22,402 train + 2,500 validation), the test split 24,676 not also in
    # the training split.
    "paper": dict(model="distilbert-base-uncased", train_size=22402, val_size=2500,
                  test_size=24676, max_length=512, epochs=3),
    # Learning rates chosen on validation by the sweep in bench/experiments/cpu_lr_sweep.md
    # (two per method: LoRA 5e-4/2e-3, full fine-tuning 5e-5/1e-4).
    # Truncation head_tail chosen on validation: bench/experiments/truncation.md.
    "cpu": dict(model="embedded-minilm", train_size=2000, val_size=500, test_size=1000,
                max_length=128, epochs=2, lora_lr=(2e-3,), full_lr=(1e-4,),
                truncation="head_tail"),
    "smoke": dict(model="tiny-distilbert", train_size=256, val_size=64, test_size=128,
                  max_length=64, epochs=1, lora_lr=(2e-3,), full_lr=(5e-4,), ranks=(4,),
                  warmup_steps=2),
}


def preset_config(name: str, **overrides: Any) -> ExperimentConfig:
    """The preset `name` with `overrides` applied (None means keep the preset's value)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    _refuse_unknown(overrides)
    values = {"data": default_data_source(), "methods": registry.default_methods(name),
              **PRESETS[name], "preset": name}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return ExperimentConfig(**values)
