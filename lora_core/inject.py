"""Model surgery: wrap an encoder's linear layers in `LoRALinear`, freeze the rest, merge.

The paper adapts the attention projections W_q, W_k, W_v, W_o (Hu et al. 2021, section
4.2 and 7.1); the presets name them per architecture, detected by `model.config.model_type`.
Only `nn.Linear` modules inside the encoder (`model.base_model`, e.g. `distilbert` or
`bert`) are candidates, so a target can never hit the classification head. For BERT the
encoder module includes the pooler, as it does for PEFT's "all-linear".

Trainable after `inject_lora`: every `lora_*` parameter plus the head modules. The head
is everything between the encoder's [CLS] state and the logits: DistilBERT's
`pre_classifier` + `classifier`, and BERT's pooler + `classifier` (the pooler is BERT's
`pre_classifier`: dense + tanh). Sentence encoders such as the embedded MiniLM were
trained with mean pooling, so their pooler is a near-initial random projection; frozen, it
starves the classifier (measured: the linear probe stayed at chance). Adapters list the
head in PEFT's `modules_to_save`, so PEFT loads them all the same. `all-linear` leaves
out the linear layers that belong to the head.
"""

from __future__ import annotations

import re

from torch import nn

from lora_core.layer import LoRALinear

_BERT_PRESETS = {
    "qkvo": ["attention.self.query", "attention.self.key", "attention.self.value",
             "attention.output.dense"],
    "qv": ["attention.self.query", "attention.self.value"],
}
# model_type -> preset name -> module-name suffixes
TARGET_PRESETS: dict[str, dict[str, list[str]]] = {
    "distilbert": {"qkvo": ["q_lin", "k_lin", "v_lin", "out_lin"], "qv": ["q_lin", "v_lin"]},
    "bert": _BERT_PRESETS,
    "roberta": _BERT_PRESETS,  # same module layout as BERT
    "xlm-roberta": _BERT_PRESETS,
    "electra": _BERT_PRESETS,
}
ALL_LINEAR = "all-linear"
HEAD_MODULES = {"distilbert": ["pre_classifier", "classifier"],  # others: ["classifier"]
                "bert": ["bert.pooler", "classifier"]}


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", ""))


def _encoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, module) of the encoder inside a HF task model (e.g. 'distilbert')."""
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix):
        return prefix, getattr(model, prefix)
    return "", model


def encoder_linear_names(model: nn.Module) -> list[str]:
    """Full names of the encoder's `nn.Linear` modules (LoRA-wrapped ones included)."""
    prefix, encoder = _encoder(model)
    wrapped = {id(m.base) for m in encoder.modules() if isinstance(m, LoRALinear)}
    names = [name for name, module in encoder.named_modules()
             if isinstance(module, LoRALinear)
             or (isinstance(module, nn.Linear) and id(module) not in wrapped)]
    return [f"{prefix}.{n}" if prefix else n for n in names]


def _suffixes(names: list[str], prefix: str) -> list[str]:
    """'distilbert.transformer.layer.3.attention.q_lin' -> 'attention.q_lin' (unique, ordered)."""
    out: dict[str, None] = {}
    for name in names:
        tail = re.split(r"(?:^|\.)\d+\.", name)[-1]
        if tail == name and prefix and name.startswith(prefix + "."):
            tail = name[len(prefix) + 1:]
        out[tail] = None
    return list(out)


def resolve_targets(model: nn.Module, targets: str) -> list[str]:
    """Full names of the encoder linear modules that `targets` selects.

    `targets` is a preset (`qkvo`, `qv`, `all-linear`) or comma-separated name suffixes
    (`q_lin,v_lin`, `attention.self.query`); each suffix must match at least one module."""
    if not isinstance(targets, str) or not targets.strip():
        raise ValueError(f"targets must be a preset or comma-separated module suffixes, "
                         f"got {targets!r}")
    candidates = encoder_linear_names(model)
    if targets == ALL_LINEAR:
        return candidates
    model_type = _model_type(model)
    presets = TARGET_PRESETS.get(model_type, {})
    if targets in ("qkvo", "qv") and targets not in presets:
        raise ValueError(f"no target preset {targets!r} for model type {model_type!r} (known: "
                         f"{sorted(TARGET_PRESETS)}); pass comma-separated module suffixes, e.g. "
                         f"{','.join(_suffixes(candidates, _encoder(model)[0])[:2])}")
    suffixes = presets.get(targets) or [t.strip() for t in targets.split(",") if t.strip()]
    if not suffixes:
        raise ValueError(f"targets {targets!r} names no module suffix")
    chosen: set[str] = set()
    for suffix in suffixes:
        hits = [n for n in candidates if n == suffix or n.endswith("." + suffix)]
        if not hits:
            existing = ", ".join(_suffixes(candidates, _encoder(model)[0]))
            raise ValueError(f"target {suffix!r} matched no linear module of the "
                             f"{model_type or type(model).__name__} encoder; its linear modules "
                             f"are: {existing} (or presets qkvo, qv, {ALL_LINEAR})")
        chosen.update(hits)
    return [n for n in candidates if n in chosen]  # model order


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` in the model, by full module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def head_module_names(model: nn.Module) -> list[str]:
    """The classification head trained alongside LoRA (PEFT's `modules_to_save`)."""
    names = HEAD_MODULES.get(_model_type(model), ["classifier"])
    modules = dict(model.named_modules())
    names = [n for n in names if n in modules or not n.endswith(".pooler")]  # add_pooling_layer=False
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"{type(model).__name__} has no head module(s) {missing}; "
                         f"pass trainable_modules explicitly")
    return list(names)


def freeze_all_but(model: nn.Module, names: list[str]) -> list[str]:
    """Freeze every parameter except those of the modules `names` and the `lora_*` factors.

    Returns the names of the parameters left trainable."""
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"module(s) {unknown} not found in {type(model).__name__}; top-level "
                         f"modules are: {[n for n, _ in model.named_children()]}")
    trainable = []
    for pname, param in model.named_parameters():
        keep = (pname.rsplit(".", 1)[-1].startswith("lora_")
                or any(pname.startswith(n + ".") for n in names))
        param.requires_grad_(keep)
        if keep:
            trainable.append(pname)
    return trainable


def inject_lora(model: nn.Module, targets: str = "qkvo", rank: int = 16, alpha: float = 16,
                dropout: float = 0.0, use_rslora: bool = False,
                trainable_modules: list[str] | None = None) -> list[str]:
    """Wrap the target linear layers of `model` in place and freeze everything else.

    Args:
        targets: `qkvo` (W_q, W_k, W_v, W_o: the paper's section 7.1 best budget split),
            `qv` (the paper's default in section 4.2), `all-linear`, or module suffixes.
        rank, alpha, dropout, use_rslora: see `LoRALinear`.
        trainable_modules: modules trained in full; None = the classification head.
    Returns:
        The full names of the wrapped modules, in model order.
    """
    existing = lora_layers(model)
    if existing:
        raise ValueError(f"model already has {len(existing)} LoRA layers (e.g. "
                         f"{next(iter(existing))}); inject into a fresh model instead")
    names = resolve_targets(model, targets)
    heads = head_module_names(model) if trainable_modules is None else list(trainable_modules)
    modules = dict(model.named_modules())
    unknown = [h for h in heads if h not in modules]
    if unknown:  # checked before any surgery, so a bad call leaves the model untouched
        raise ValueError(f"trainable module(s) {unknown} not found in {type(model).__name__}")
    overlap = [n for n in names if any(n == h or n.startswith(h + ".") for h in heads)]
    if targets == ALL_LINEAR:  # the head is trained in full, not adapted
        names, overlap = [n for n in names if n not in overlap], []
    if overlap:
        raise ValueError(f"targets {overlap} lie inside trainable modules {heads}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout,
                                          use_rslora))
    freeze_all_but(model, heads)
    # What save_adapter needs to write adapter_config.json (PEFT's LoraConfig fields).
    model.lora_spec = {"targets": targets, "target_modules": names, "rank": int(rank),
                       "alpha": float(alpha), "dropout": float(dropout),
                       "use_rslora": bool(use_rslora), "modules_to_save": heads}
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every LoRA update into its base weight (idempotent); returns the merged names."""
    layers = lora_layers(model)
    done = []
    for name, layer in layers.items():
        try:
            if not layer.merged:
                layer.merge()
                done.append(layer)
        except ValueError as err:
            for merged in done:  # all or nothing: never leave a half-merged model
                merged.unmerge()
            raise ValueError(f"{name}: {err}") from err
    return list(layers)


def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo `merge_lora` (idempotent); returns the unmerged names."""
    layers = lora_layers(model)
    for layer in layers.values():
        layer.unmerge()
    return list(layers)


def unwrap_lora(model: nn.Module) -> nn.Module:
    """Merge, then put each wrapped base `nn.Linear` back in place: a plain model again."""
    merge_lora(model)
    for name, layer in lora_layers(model).items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base)
    if hasattr(model, "lora_spec"):
        del model.lora_spec
    return model
