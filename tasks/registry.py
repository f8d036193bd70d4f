"""The method registry: every method the experiment can run, declared once, and the
`Variant` value that names one run of one method.

Everything else reads this module: config validation and the presets' default methods,
the CLI's choices, the DAG's trigger form and its GPU-pool routing, the training and
evaluation steps, the report's labels and colours, the benchmark. To add a method, add a
`Method` below and its module `tasks/methods/<name>.py` (see tasks/methods/__init__.py
for what that module provides).

Standard library only: the DAG file imports this module when Airflow parses it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Literal

SWEEP_DIMS = ("rank", "targets", "lr", "seed")  # a variant name lists them in this order
TARGETS_PATTERN = r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$"  # target sets: names, commas


@dataclass(frozen=True)
class Method:
    """One way of getting predictions for IMDB, as the experiment runs it.

    kind: `baseline` (no gradient training; one variant, or none per sweep dimension) or
        `trained` (gradient training through tasks.train, tuned over learning rates).
    uses_encoder: runs the pretrained encoder, so it takes the GPU pool and queue.
    lr_field: the config field holding the learning rates this method is tuned over.
    dims: the sweep dimensions its variants vary over (a subset of SWEEP_DIMS, in order).
    artifact: the folder of results/<variant>/ its trained model is saved to.
    mergeable: its adaptation folds into the base weights (latency unmerged/merged/base).
    presets: the presets that run it by default (None: every preset).
    reads: what of a review it reads: `labels` (no text), `whole` (every word), `encoder`
        (the tokens the encoder reads: max_length and truncation). The report states it.
    """

    name: str
    kind: Literal["baseline", "trained"]
    label: str
    color: str  # Okabe-Ito where possible: readable for colour-blind readers
    uses_encoder: bool
    description: str
    lr_field: str | None = None
    dims: tuple[str, ...] = ()
    artifact: str | None = None
    mergeable: bool = False
    presets: tuple[str, ...] | None = None
    reads: Literal["labels", "whole", "encoder"] = "encoder"

    @property
    def module(self) -> str:
        """The module that implements it (imported only when a variant runs)."""
        return f"tasks.methods.{self.name}"

    @property
    def trained(self) -> bool:
        return self.kind == "trained"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("majority", "baseline", "majority class", "#888888", False,
           "the most frequent training label for every review: the floor", reads="labels"),
    Method("tfidf_logreg", "baseline", "TF-IDF + logistic regression", "#56B4E9", False,
           "word uni- and bigrams, logistic regression with C chosen by cross-validation",
           reads="whole"),
    Method("tfidf_same_input", "baseline", "TF-IDF on the encoder's input", "#1F5F8B", False,
           "the same TF-IDF model on exactly the tokens the encoder reads: what the input "
           "budget alone is worth"),
    Method("zero_shot", "baseline", "zero-shot", "#009E73", True,
           "the pretrained model without IMDB labels: label descriptions or a cloze prompt"),
    Method("seed_heuristic", "baseline", "notebook heuristic", "#444444", True,
           "the seed notebook's sign of the summed [CLS] vector; not a classifier"),
    Method("linear_probe", "baseline", "linear probe", "#CC79A7", True,
           "logistic regression on frozen encoder features, pooling and C chosen by CV on train"),
    Method("lora", "trained", "LoRA", "#0072B2", True,
           "low-rank adapters on the chosen projections, base frozen (Hu et al. 2021)",
           lr_field="lora_lr", dims=("rank", "targets", "lr", "seed"), artifact="adapter",
           mergeable=True),
    Method("full_finetune", "trained", "full fine-tuning", "#D55E00", True,
           "every weight of the encoder and the head trained",
           lr_field="full_lr", dims=("lr", "seed"), artifact="checkpoint"),
    Method("bitfit", "trained", "BitFit", "#E69F00", True,
           "only the bias terms and the head trained (Ben Zaken et al. 2022)",
           lr_field="lora_lr", dims=("lr", "seed"), artifact="bitfit", presets=("smoke",)),
)}


def method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}") from None


def default_methods(preset: str) -> tuple[str, ...]:
    """The methods a preset runs unless told otherwise, in registry order."""
    return tuple(m.name for m in METHODS.values() if m.presets is None or preset in m.presets)


# --- variants ---------------------------------------------------------------------------

def format_lr(lr: float) -> str:
    """Shortest exact scientific form: 0.0005 -> '5e-4', 0.00015 -> '1.5e-4'."""
    return format(Decimal(repr(float(lr))).normalize(), "e")


def normalise_targets(targets: str) -> str:
    """`q_lin, v_lin` -> `q_lin,v_lin`; refuses anything the trigger form would refuse."""
    text = ",".join(part.strip() for part in str(targets).split(","))
    if not re.match(TARGETS_PATTERN, text):
        raise ValueError(f"target set {targets!r}: expected a preset (qkvo, qv, all-linear) or "
                         "comma-separated module names of letters, digits, '_', '.' and '-'")
    return text


@dataclass(frozen=True)
class Variant:
    """One run of one method: the method plus its value on each of its sweep dimensions.

    Its name is the results folder and the id everything else uses; `name` builds it and
    `parse` reads it back, nothing else does either:
        lora_r16_qkvo_lr5e-4_s42, full_finetune_lr5e-5_s42, linear_probe, majority
    """

    method: str
    rank: int | None = None
    targets: str | None = None
    lr: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        dims = method(self.method).dims
        for dim in SWEEP_DIMS:
            value = getattr(self, dim)
            if (value is None) != (dim not in dims):
                raise ValueError(f"{self.method} variants {'need' if dim in dims else 'take no'} "
                                 f"{dim!r} (got {value!r}); its dimensions are {list(dims)}")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.seed is not None and (not _is_int(self.seed) or self.seed < 0):
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and 0 < self.lr < 1):
            raise ValueError(f"learning rate must be in (0, 1), got {self.lr!r}")
        if self.targets is not None:
            object.__setattr__(self, "targets", normalise_targets(self.targets))
        if self.lr is not None:
            object.__setattr__(self, "lr", float(self.lr))

    @property
    def name(self) -> str:
        return self._join(with_seed=True)

    @property
    def config_name(self) -> str:
        """The name without the seed: what the seeds of one configuration share."""
        return self._join(with_seed=False)

    def _join(self, with_seed: bool) -> str:
        parts = [self.method]
        if self.rank is not None:
            parts.append(f"r{self.rank}")
        if self.targets is not None:
            parts.append(self.targets.replace(",", "+"))
        if self.lr is not None:
            parts.append(f"lr{format_lr(self.lr)}")
        if with_seed and self.seed is not None:
            parts.append(f"s{self.seed}")
        return "_".join(parts)

    def label(self, seed: bool = True) -> str:
        """For people: `LoRA r=16 qkvo, lr 5e-4, seed 42`."""
        text = method(self.method).label
        if self.rank is not None:
            text += f" r={self.rank} {self.targets}"
        if self.lr is not None:
            text += f", lr {format_lr(self.lr)}"
        if seed and self.seed is not None:
            text += f", seed {self.seed}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Variant:
        return cls(**{k: v for k, v in data.items() if k != "name"})

    @classmethod
    def parse(cls, name: str) -> Variant:
        """The variant a results folder name stands for; ValueError if it names none."""
        for m in sorted(METHODS.values(), key=lambda m: -len(m.name)):  # longest prefix first
            if name == m.name or name.startswith(m.name + "_"):
                match = _name_pattern(m).fullmatch(name)
                if not match:
                    break
                values: dict[str, Any] = {k: v for k, v in match.groupdict().items()}
                for key, kind in (("rank", int), ("seed", int), ("lr", float)):
                    if values.get(key) is not None:
                        values[key] = kind(values[key])
                if values.get("targets") is not None:
                    values["targets"] = values["targets"].replace("+", ",")
                return cls(m.name, **values)
        raise ValueError(f"{name!r} is not a variant name (e.g. lora_r16_qkvo_lr5e-4_s42, "
                         f"majority)")


def _name_pattern(m: Method) -> re.Pattern[str]:
    parts = {"rank": r"r(?P<rank>\d+)", "targets": r"(?P<targets>[A-Za-z0-9_.+-]+?)",
             "lr": r"lr(?P<lr>\d(?:\.\d+)?e-?\d+)", "seed": r"s(?P<seed>\d+)"}
    return re.compile("_".join([re.escape(m.name)] + [parts[d] for d in m.dims]))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def enumerate_variants(methods: Iterable[str], values: dict[str, Iterable[Any]]) -> list[Variant]:
    """Every variant of `methods` (registry order) over the sweep `values`: `rank`,
    `targets`, `seed` lists, and for each method the list under its `lr_field`."""
    out = []
    for m in METHODS.values():
        if m.name not in set(methods):
            continue
        axes = [list(values[m.lr_field] if d == "lr" else values[d]) for d in m.dims]
        for combo in itertools.product(*axes):
            out.append(Variant(m.name, **dict(zip(m.dims, combo))))
    return out


def group_by_configuration(variants: Iterable[Variant]) -> dict[str, list[Variant]]:
    """Variants keyed by configuration name, seeds in ascending order."""
    groups: dict[str, list[Variant]] = {}
    for v in variants:
        groups.setdefault(v.config_name, []).append(v)
    return {k: sorted(vs, key=lambda v: -1 if v.seed is None else v.seed)
            for k, vs in groups.items()}


