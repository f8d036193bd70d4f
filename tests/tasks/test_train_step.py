"""The training step without host syncs (tasks.train): the losses it logs are the floats
the old per-step `float(loss)` gave, fused AdamW, pinned non-blocking copies and TF32 only
on CUDA, SDPA attention, and `auto` precision's per-shape rule on CUDA GPUs."""

from __future__ import annotations

import logging

import pytest
import torch

from lora_core.inject import inject_lora
from tasks import evaluate, train
from tasks.models import load_classifier
from tasks.tokenize import load_split, tokenize_dataset


@pytest.fixture
def frames(smoke_run, imdb_sample):
    """64 train (4 batches of 16) / 32 validation rows of real reviews, 32 tokens."""
    config, paths = smoke_run
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 64), ("validation", 32), ("test", 32)):
        imdb_sample[split].head(size).to_parquet(paths.split_parquet(split))
    tokenize_dataset(config, paths)
    return config, load_split(paths, "train"), load_split(paths, "validation")


def test_logged_losses_are_what_float_loss_gave_every_step(frames, monkeypatch, caplog):
    """The loop keeps each step's loss on the device and copies the pending ones when it
    logs; a forward hook records `float(loss)` right after each training forward pass, as
    the loop did before. Batch 2: two epochs of 32 steps, logged every 3 (the rest at each
    epoch's end): the same floats."""
    config, train_df, val_df = frames
    config = config.with_overrides(epochs=2, batch_size=2)
    made: list[dict] = []
    real_adamw = torch.optim.AdamW

    def spy_adamw(*args, **kwargs):
        made.append(kwargs)
        return real_adamw(*args, **kwargs)

    monkeypatch.setattr(train.torch.optim, "AdamW", spy_adamw)
    train.seed_everything(0)
    model = load_classifier("tiny-distilbert", seed=0)
    inject_lora(model, "qkvo", rank=4, alpha=8)
    per_step: list[float] = []
    hooked: list[list] = []  # what the tracking hook saw at each logging point
    model.register_forward_hook(
        lambda module, args, out: per_step.append(float(out.loss.detach())) if module.training else None)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        result = train.fit(model, train_df, val_df, lr=5e-3, config=config, seed=0, device="cpu",
                           on_log=lambda losses, _: hooked.append([h["loss"] for h in losses]))
    logged = [h["loss"] for h in result.loss_history]
    assert [h["step"] for h in result.loss_history] == list(range(1, 65))
    assert logged == per_step  # exactly the same floats, in step order
    assert all(isinstance(v, float) for v in logged) and len(set(logged)) > 1
    assert made == [{"lr": 5e-3}]  # no `fused` on the CPU: torch's default implementation
    step_lines = [r.getMessage() for r in caplog.records if " step " in r.getMessage()]
    assert len(step_lines) == 21  # steps 3, 6, ..., 63
    assert f"step 63/64 loss {logged[62]:.4f} " in step_lines[-1]
    # the hook (experiment tracking) sees every loss up to its step, never a pending one
    assert len(hooked) == 21 + 2  # the logging points, then after each epoch's evaluation
    assert all(seen == logged[: len(seen)] for seen in hooked)
    assert [len(seen) for seen in hooked[:2]] == [3, 6] and len(hooked[-1]) == 64


def test_the_loss_history_is_the_same_on_a_rerun_with_the_same_seed(frames):
    config, train_df, val_df = frames

    def once():
        train.seed_everything(1)
        model = load_classifier("tiny-distilbert", seed=1)
        inject_lora(model, "qkvo", rank=4, alpha=8)
        return train.fit(model, train_df, val_df, lr=5e-3, config=config, seed=1, device="cpu")

    a, b = once(), once()
    assert a.loss_history == b.loss_history
    assert (a.val_prob == b.val_prob).all()


def test_fused_adamw_only_on_cuda():
    assert train.optimizer_options("cpu") == {}
    assert train.optimizer_options(torch.device("cpu")) == {}
    assert train.optimizer_options("cuda:0") == {"fused": True}
    assert train.optimizer_options("cuda") == {"fused": True}


class FakeTensor:
    """Records what `to_device` asks of a tensor."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def pin_memory(self):
        self.calls.append(("pin_memory",))
        return self

    def to(self, device, non_blocking=False):
        self.calls.append(("to", str(device), non_blocking))
        return self


def test_batches_are_pinned_and_copied_without_blocking_only_on_cuda():
    on_gpu, on_cpu = FakeTensor(), FakeTensor()
    train.to_device(on_gpu, "cuda:1")
    train.to_device(on_cpu, "cpu")
    assert on_gpu.calls == [("pin_memory",), ("to", "cuda:1", True)]
    assert on_cpu.calls == [("to", "cpu", False)]
    real = torch.arange(4)
    moved = train.to_device(real, "cpu")
    assert moved is real and not moved.is_pinned()


def test_tf32_is_left_alone_on_the_cpu():
    before = torch.backends.cuda.matmul.fp32_precision
    assert train.use_tf32("cpu") is False
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_the_models_run_sdpa_attention():
    for source in ("tiny-distilbert", "embedded-minilm"):
        assert load_classifier(source).config._attn_implementation == "sdpa", source


@pytest.mark.parametrize("tokens, expected", [(16 * 128, None), (16 * 64, None),
                                              (16 * 512, torch.bfloat16),
                                              (None, torch.bfloat16)])
def test_auto_on_a_bf16_gpu_picks_fp32_for_small_batches_bf16_for_large(monkeypatch, tokens,
                                                                         expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert evaluate.autocast_dtype("auto", "cuda:0", tokens_per_batch=tokens) == expected
    assert evaluate.autocast_dtype("bf16", "cuda:0", tokens_per_batch=16 * 128) == torch.bfloat16
    assert evaluate.autocast_dtype("fp32", "cuda:0", tokens_per_batch=16 * 512) is None


def test_auto_on_the_cpu_ignores_the_shape():
    native = evaluate.cpu_has_native_bf16()
    for tokens in (16 * 64, 16 * 512, None):
        assert evaluate.autocast_dtype("auto", "cpu", tokens_per_batch=tokens) == (
            torch.bfloat16 if native else None)
