"""Save and load LoRA adapters in PEFT's on-disk LoRA format, and export merged models.

An adapter folder holds `adapter_config.json` (the fields of PEFT's `LoraConfig`) and
`adapter_model.safetensors` whose keys are the ones `PeftModel.save_pretrained` writes:

    base_model.model.<module>.lora_A.weight   (r, in)
    base_model.model.<module>.lora_B.weight   (out, r)
    base_model.model.<head>.<param>           heads listed in `modules_to_save`, saved in full

so `peft.PeftModel.from_pretrained(base, folder)` loads ours and `load_adapter` loads PEFT's.
PEFT itself is not imported here (it is a test-only dependency). Files are written
straight into the folder given; a caller that needs the folder to appear complete or not
at all writes into a temporary folder and renames it (the pipeline does:
`tasks.paths.atomic_dir`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora_core.inject import head_module_names, inject_lora, lora_layers, unwrap_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model


def _spec(model: nn.Module) -> dict:
    """The injection settings; inferred from the layers when `lora_spec` is absent."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA layers; call inject_lora first")
    spec = getattr(model, "lora_spec", None)
    if spec is not None:
        return spec
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {"target_modules": list(layers), "rank": first.rank, "alpha": first.alpha,
            "dropout": dropout, "use_rslora": first.use_rslora,
            "modules_to_save": head_module_names(model)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA factors and head weights under PEFT's key names (unmerged values)."""
    spec = _spec(model)
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.detach()
        state[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.detach()
    for head in spec["modules_to_save"]:
        for pname, param in model.get_submodule(head).named_parameters():
            state[f"{PREFIX}{head}.{pname}"] = param.detach()
    return {k: v.cpu().contiguous() for k, v in state.items()}


def adapter_config(model: nn.Module, base_model: str) -> dict:
    """PEFT LoraConfig fields. Targets are the exact wrapped module names, so PEFT's
    suffix matching selects precisely the modules we wrapped."""
    spec = _spec(model)
    return {
        "peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model,
        "r": spec["rank"], "lora_alpha": spec["alpha"], "lora_dropout": spec["dropout"],
        "use_rslora": spec["use_rslora"], "target_modules": list(spec["target_modules"]),
        "modules_to_save": list(spec["modules_to_save"]), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "revision": None,
    }


def save_adapter(model: nn.Module, out_dir: Path | str, base_model: str) -> Path:
    """Write the adapter (LoRA factors + trained heads) of `model` to `out_dir` in PEFT format.

    Args:
        base_model: the model source the adapter applies to (recorded as
            `base_model_name_or_path`).
    Returns:
        `out_dir`.
    """
    out_dir = Path(out_dir)
    # The factors are the adapter whether or not they are merged into W0 right now.
    config, state = adapter_config(model, base_model), adapter_state_dict(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    return out_dir


def _check_supported(config: dict, where: Path) -> None:
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {config.get('peft_type')!r} is not supported "
                         "(expected 'LORA')")
    unsupported = {"use_dora": False, "bias": "none", "fan_in_fan_out": False,
                   "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}
    for key, plain in unsupported.items():
        value = config.get(key, plain)
        if value not in (plain, None):
            raise ValueError(f"{where}: {key}={value!r} is not supported by lora_core "
                             f"(expected {plain!r})")


def load_adapter(model: nn.Module, adapter_dir: Path | str) -> nn.Module:
    """Load a PEFT-format LoRA adapter (ours or PEFT's) into `model`, in place.

    A model without LoRA layers is injected first (modules named by the weight file, the
    config's r / lora_alpha / lora_dropout / use_rslora, heads from `modules_to_save`);
    a model with LoRA layers must have exactly the adapter's modules. Returns `model`."""
    adapter_dir = Path(adapter_dir)
    config_path, weights_path = adapter_dir / CONFIG_NAME, adapter_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.exists():
            raise ValueError(f"{adapter_dir} is not a PEFT adapter folder: {path.name} missing")
    config = json.loads(config_path.read_text())
    _check_supported(config, adapter_dir)
    state = {k.removeprefix(PREFIX): v for k, v in load_file(str(weights_path)).items()}

    factors = {}  # module name -> {"lora_A": t, "lora_B": t}
    heads = {}  # full parameter name -> tensor
    for key, tensor in state.items():
        for factor in ("lora_A", "lora_B"):
            if key.endswith(f".{factor}.weight"):
                factors.setdefault(key[: -len(f".{factor}.weight")], {})[factor] = tensor
                break
        else:
            heads[key] = tensor
    modules = dict(model.named_modules())
    saved_heads = [m for m in dict.fromkeys(config.get("modules_to_save") or [])
                   if m in modules and any(k.startswith(m + ".") for k in heads)]
    stray = [k for k in heads if not any(k.startswith(m + ".") for m in saved_heads)]
    if stray:
        raise ValueError(f"{weights_path}: weights {stray[:5]} belong to no LoRA layer and no "
                         f"module in modules_to_save {config.get('modules_to_save')}")

    if not lora_layers(model):
        inject_lora(model, targets=",".join(factors), rank=int(config["r"]),
                    alpha=float(config["lora_alpha"]),
                    dropout=float(config.get("lora_dropout") or 0.0),
                    use_rslora=bool(config.get("use_rslora", False)),
                    trainable_modules=saved_heads)
    layers = lora_layers(model)
    if set(layers) != set(factors):
        raise ValueError(f"{adapter_dir}: adapter modules differ from the model's LoRA layers "
                         f"(only in adapter: {sorted(set(factors) - set(layers))[:5]}, only in "
                         f"model: {sorted(set(layers) - set(factors))[:5]})")
    with torch.no_grad():
        for name, layer in layers.items():
            layer.unmerge()  # new factors must not be subtracted from an old merge later
            for factor, tensor in factors[name].items():
                target = getattr(layer, factor)
                if target.shape != tensor.shape:
                    raise ValueError(f"{name}.{factor}: adapter shape {tuple(tensor.shape)} "
                                     f"!= model shape {tuple(target.shape)}")
                target.copy_(tensor)
        params = dict(model.named_parameters())
        for key, tensor in heads.items():
            if key not in params or params[key].shape != tensor.shape:
                raise ValueError(f"{adapter_dir}: head weight {key} {tuple(tensor.shape)} does "
                                 f"not fit the model")
            params[key].copy_(tensor)
    return model


def save_merged(model: nn.Module, tokenizer, out_dir: Path | str) -> Path:
    """Export a plain Hugging Face model with every LoRA update folded into its weights.

    Works on a copy (the caller's model keeps its LoRA layers and merge state); the export
    has no `lora_*` keys and reloads with `AutoModelForSequenceClassification`. The
    tokenizer, when given, is saved beside it. Returns `out_dir`."""
    out_dir = Path(out_dir)
    plain = unwrap_lora(copy.deepcopy(model))
    plain.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
