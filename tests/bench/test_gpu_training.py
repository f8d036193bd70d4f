"""On a CUDA device: tasks.train's loop trains under bf16 autocast and under fp16 with loss
scaling without NaNs while the loss falls, and the GPU lease hands out the real device.
Skipped without CUDA; bench/gpu.sh runs them (`pytest -m gpu`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

EPOCHS = 30  # one batch of 16 rows, 30 steps: a tiny model fits them (fp32 on CPU: loss 0.69 -> 0.2)


@pytest.fixture
def frames(smoke_run):
    """Tokenized train and validation frames of a 64/32-row smoke run on real reviews."""
    from tasks.data import download_dataset
    from tasks.tokenize import load_split, tokenize_dataset

    config, paths = smoke_run
    download_dataset(config, paths)
    tokenize_dataset(config, paths)
    train = load_split(paths, "train").iloc[:16].reset_index(drop=True)  # one batch
    return config, train, load_split(paths, "validation")


def fit_tiny(frames, dtype: torch.dtype, lora: bool, lr: float):
    from lora_core.inject import inject_lora
    from tasks.models import load_classifier
    from tasks.train import fit, seed_everything

    config, train, validation = frames
    config = config.with_overrides(epochs=EPOCHS)
    seed_everything(0)
    model = load_classifier("tiny-distilbert", seed=0)
    if lora:
        inject_lora(model, "qkvo", rank=4, alpha=8)
    else:
        model.requires_grad_(True)
    return fit(model, train, validation, lr=lr, config=config, seed=0, device="cuda",
               dtype=dtype)


def assert_finite_and_falling(result) -> None:
    losses = [h["loss"] for h in result.loss_history]
    assert len(losses) == EPOCHS and all(np.isfinite(losses)), losses
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert np.isfinite(result.val_prob).all()


def test_bf16_autocast_lora_training_is_finite_and_lowers_the_loss(frames):
    assert_finite_and_falling(fit_tiny(frames, torch.bfloat16, lora=True, lr=1e-2))


def test_fp16_with_grad_scaler_has_no_nan_and_lowers_the_loss(frames):
    # fit uses a GradScaler for fp16: overflowing steps are skipped, never a NaN loss
    assert_finite_and_falling(fit_tiny(frames, torch.float16, lora=False, lr=3e-3))


def test_gpu_lease_hands_out_the_cuda_device_and_holds_it(monkeypatch, artifacts):
    from tasks import gpu

    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LORAFLOW_TASKS_PER_GPU", raising=False)  # one task per GPU
    count = torch.cuda.device_count()
    with gpu.gpu_lease() as device:
        assert device == "cuda:0"
        torch.zeros(1, device=device)  # the device string is usable as it is
        assert (artifacts / "locks" / "gpu-0.lock").exists()
        if count == 1:  # the only device is taken: a second lease waits, then gives up
            with pytest.raises(TimeoutError):
                with gpu.gpu_lease(timeout_s=0.3, poll_s=0.1):
                    pass
    with gpu.gpu_lease(timeout_s=1) as again:  # released: available again
        assert again == "cuda:0"


def test_cuda_step_is_fused_and_logs_the_floats_float_loss_gives(frames, monkeypatch):
    """The step without host syncs on a real GPU: fused AdamW, TF32 where the GPU has it,
    and a loss history equal to each step's float(loss) (a hook syncs for the check)."""
    from lora_core.inject import inject_lora
    from tasks import train
    from tasks.models import load_classifier

    config, train_df, validation = frames
    config = config.with_overrides(epochs=EPOCHS)
    made: list[dict] = []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(train.torch.optim, "AdamW",
                        lambda *a, **k: made.append(k) or real_adamw(*a, **k))
    train.seed_everything(0)
    model = load_classifier("tiny-distilbert", seed=0)
    inject_lora(model, "qkvo", rank=4, alpha=8)
    per_step: list[float] = []
    model.register_forward_hook(
        lambda m, args, out: per_step.append(float(out.loss.detach())) if m.training else None)
    result = train.fit(model, train_df, validation, lr=1e-2, config=config, seed=0,
                       device="cuda", dtype=None)
    assert made == [{"lr": 1e-2, "fused": True}]
    assert [h["loss"] for h in result.loss_history] == per_step
    if torch.cuda.get_device_capability() >= (8, 0):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"


def test_pinned_non_blocking_copy_arrives_intact():
    from tasks.train import to_device

    source = torch.arange(16 * 128).reshape(16, 128)
    moved = to_device(source, "cuda:0")
    assert moved.device.type == "cuda" and torch.equal(moved.cpu(), source)


def test_auto_precision_on_this_gpu_follows_the_batch_shape():
    from tasks.evaluate import autocast_dtype

    if not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    assert autocast_dtype("auto", "cuda:0", tokens_per_batch=16 * 128) is None
    assert autocast_dtype("auto", "cuda:0", tokens_per_batch=16 * 512) == torch.bfloat16


def test_k_slot_lease_admits_k_tasks_per_real_device(monkeypatch, artifacts):
    import contextlib

    from tasks import gpu

    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("LORAFLOW_TASKS_PER_GPU", "2")
    count = torch.cuda.device_count()
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(gpu.gpu_lease(timeout_s=1)) for _ in range(2 * count)]
        assert sorted(held) == sorted(f"cuda:{i}" for i in range(count) for _ in range(2))
        with pytest.raises(TimeoutError), gpu.gpu_lease(timeout_s=0.3, poll_s=0.1):
            pass
