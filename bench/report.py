"""bench.md from bench.json: the side-by-side tables, every number from the run itself."""

from __future__ import annotations

from typing import Any


def _ratio(x: float) -> str:
    return f"{x:.2f}x"


def machine_lines(results: dict[str, Any]) -> list[str]:
    m = results["machine"]
    device = m["device"] + (f" ({m['device_name']})" if m.get("device_name") else "")
    return [f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} torch threads (every "
            "contender ran in this one process, so all used the same thread count), CPU "
            f"native bf16: {'yes' if m['cpu_native_bf16'] else 'no'}; device {device}; "
            f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}, "
            f"Python {m['python']}. Mode: {results['mode']}."]


def step_lines(results: dict[str, Any]) -> list[str]:
    rows = results["train_step"]
    lines = ["## Per training step (AdamW)", "",
             (f"Batch {results['batch']} x {results['seq_len']} tokens of real reviews; forward "
              "under the precision's autocast, backward, clipping at 1.0, AdamW update. LoRA "
              "rows: r=16, alpha 16 on q, k, v, o plus the classification head (same "
              "trainable count in loraflow and PEFT). Median of "
              f"{rows[0]['rounds']} rounds, contenders interleaved round by round. `auto` is "
              "loraflow's default: bf16 autocast where the device has native bf16, else fp32 "
              "(the precision column says which ran). Ratio = ms/step / loraflow LoRA auto's "
              "(above 1: slower than loraflow's default)."), "",
             "| model | contender | precision | ms/step | vs loraflow LoRA auto | trainable |",
             "| --- | --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['name']} | {r['precision']} | {r['ms_per_step']:.1f} "
                     f"| {_ratio(r['ms_per_step_vs_loraflow'])} | {r['params_trainable']:,} |")
    return lines


def e2e_lines(results: dict[str, Any]) -> list[str]:
    e2e = results["end_to_end"]
    if "error" in e2e:
        return ["## End to end: Parquet rows to validation accuracy", "",
                f"Could not run on this machine: `{e2e['error']}`."]
    c = e2e["config"]
    lines = ["## End to end: Parquet rows to validation accuracy", "",
             (f"One LoRA variant: {c['model']}, train {c['train_size']:,} / validation "
              f"{c['val_size']:,} rows (loraflow's own subset selection; identical rows in "
              f"every contender: {'yes' if e2e['same_rows'] else 'NO'}), max length "
              f"{c['max_length']}, {c['epochs']} epoch(s), batch {c['batch_size']}, lr "
              f"{c['lora_lr'][0]:g}, r={c['ranks'][0]} {c['targets'][0]}, alpha "
              f"{c['lora_alpha']:g}, seed {c['seeds'][0]}. Seconds: reading the Parquet file, "
              "tokenization, model loading, training and validation evaluation. ms/step: the "
              "training loop's seconds / optimizer steps. Ratios: contender / loraflow (above "
              "1: loraflow faster)."), "",
             "| contender | seconds | vs loraflow | ms/step | vs loraflow | validation accuracy "
             "| minus loraflow | steps | precision | threads |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in e2e["rows"]:
        lines.append(f"| {r['name']} | {r['seconds']:.1f} | {_ratio(r['seconds_vs_loraflow'])} | "
                     f"{r['ms_per_step']:.1f} | {_ratio(r['ms_per_step_vs_loraflow'])} | "
                     f"{r['accuracy']:.4f} | {r['accuracy_minus_loraflow']:+.4f} | {r['steps']} "
                     f"| {r['precision']} | {r['threads']} |")
    lines += ["", "What each clock also holds, by the contender's own design:", "",
              (f"- loraflow: its real path: run folder and config, the download step (normalised "
               f"copy of the full splits, subsets written), the tokenize step (cold cache), "
               f"`run_variant`: batches grouped by length, warm-up and linear decay, "
               f"validation after every epoch, a checkpoint per epoch, the PEFT-format adapter "
               f"saved, batch-1 latency unmerged/merged/bare and scoring of a "
               f"{c['test_size']}-row test subset (kept to one batch). No Great "
               f"Expectations validation step."),
              ("- PEFT + Trainer: `Dataset.map` tokenization, dynamic padding, Trainer's "
               "defaults (linear decay, no warm-up, clipping at 1.0, fp32, evaluation batch 8), "
               "`trainer.predict` on validation once at the end; `modules_to_save` is "
               "`classifier` as the PEFT documentation writes it, so BERT's pooler stays frozen "
               "where loraflow trains it as part of the head."),
              ("- seed notebook loop: the slow pure-Python tokenizer called on every batch "
               "(training and evaluation), rows in subset order, constant learning rate, no "
               "clipping, fp32, validation after every epoch; trains LoRA + `classifier` (BERT's "
               "pooler frozen, as in the PEFT row).")]
    return lines


def inference_lines(results: dict[str, Any]) -> list[str]:
    table: dict[tuple[str, int], dict[str, float]] = {}
    for r in results["inference"]:
        table.setdefault((r["model"], r["batch"]), {})[r["variant"]] = r["ms_per_example"]
    lines = ["## Inference: LoRA merged vs the bare model", "",
             ("ms per example (median of the repeats); the LoRA update is random but non-zero, "
              "as after training. Merged vs bare = (merged - bare) / bare: merging folds B A "
              "into W, so the merged model should cost what the bare one does."), "",
             "| model | batch | bare | LoRA unmerged | LoRA merged | merged vs bare |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for (model, batch), v in table.items():
        diff = 100 * (v["lora merged"] - v["bare"]) / v["bare"]
        lines.append(f"| {model} | {batch} | {v['bare']:.2f} | {v['lora unmerged']:.2f} | "
                     f"{v['lora merged']:.2f} | {diff:+.1f}% |")
    return lines


def tokenize_lines(results: dict[str, Any]) -> list[str]:
    t = results["tokenize"]
    return ["## Tokenization cache", "",
            (f"{t['examples']:,} real reviews at {t['max_length']} tokens: cold "
             f"{t['cold_seconds']:.2f} s, cache hit {t['cache_hit_seconds']:.2f} s.")]


def markdown(results: dict[str, Any]) -> str:
    from bench.flops import markdown_lines as throughput_lines

    sections = [[f"# loraflow benchmark ({results['machine']['when']})", "",
                 *machine_lines(results)],
                step_lines(results), e2e_lines(results)]
    if results["machine"]["device"].startswith("cuda"):
        sections.append(["## GPU throughput of full fine-tuning", "", *throughput_lines(results)])
    sections += [inference_lines(results), tokenize_lines(results)]
    return "\n\n".join("\n".join(s) for s in sections) + "\n"
