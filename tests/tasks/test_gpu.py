"""GPU leases: never two holders of one device, a waiter gets the first device freed, and
the CPU where there is no CUDA. CUDA is faked by the device count; the locks are real."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tasks import gpu


@pytest.fixture
def two_gpus(monkeypatch, artifacts):
    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu, "_cuda_device_count", lambda: 2)
    return artifacts / "locks"


def test_no_cuda_yields_cpu(monkeypatch, artifacts):
    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    monkeypatch.setattr(gpu, "_cuda_device_count", lambda: 0)
    with gpu.gpu_lease() as device:
        assert device == "cpu"
    assert not (artifacts / "locks").exists()


def test_real_device_count_on_this_machine_without_cuda(monkeypatch, artifacts):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    with gpu.gpu_lease() as device:
        assert device == "cpu"


def test_loraflow_device_cpu_forces_the_cpu(two_gpus, monkeypatch):
    monkeypatch.setenv("LORAFLOW_DEVICE", "cpu")
    with gpu.gpu_lease() as device:
        assert device == "cpu"


def test_two_leases_get_different_devices(two_gpus):
    with gpu.gpu_lease() as first, gpu.gpu_lease() as second:
        assert {first, second} == {"cuda:0", "cuda:1"}
    assert sorted(p.name for p in two_gpus.iterdir()) == ["gpu-0.lock", "gpu-1.lock"]


def test_third_lease_waits_until_one_is_released(two_gpus):
    got: dict[str, object] = {}
    release_first = threading.Event()

    def holder():
        with gpu.gpu_lease() as device:
            got["first"] = device
            release_first.wait(10)

    t = threading.Thread(target=holder)
    t.start()
    while "first" not in got:
        time.sleep(0.01)
    with gpu.gpu_lease() as second:
        def waiter():
            with gpu.gpu_lease(timeout_s=10, poll_s=0.05) as device:
                got["third"], got["third_at"] = device, time.monotonic()

        w = threading.Thread(target=waiter)
        w.start()
        time.sleep(0.3)
        assert "third" not in got  # both devices are leased: it waits
        released_at = time.monotonic()
        release_first.set()
        w.join(10)
        t.join(10)
        assert got["third"] == got["first"] != second
        assert got["third_at"] >= released_at


def test_lease_times_out_when_all_devices_stay_busy(two_gpus):
    with gpu.gpu_lease(), gpu.gpu_lease():
        start = time.monotonic()
        with (pytest.raises(TimeoutError, match="no GPU became free"),
              gpu.gpu_lease(timeout_s=0.2, poll_s=0.05)):
            pass
        assert time.monotonic() - start >= 0.2


def test_lease_is_released_when_the_task_raises(two_gpus):
    with pytest.raises(RuntimeError), gpu.gpu_lease() as device:
        assert device == "cuda:0"
        raise RuntimeError("training blew up")
    with gpu.gpu_lease() as device:
        assert device == "cuda:0"


def test_a_device_locked_by_another_process_is_skipped(two_gpus):
    """Another process (another Airflow task, the CLI) holds cuda:0: we get cuda:1."""
    two_gpus.mkdir(parents=True, exist_ok=True)
    script = textwrap.dedent(f"""
        import sys, time
        from filelock import FileLock
        with FileLock({str(two_gpus / 'gpu-0.lock')!r}):
            print("locked", flush=True)
            sys.stdin.readline()
    """)
    other = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with gpu.gpu_lease() as device:
            assert device == "cuda:1"
    finally:
        other.communicate("\n", timeout=10)
    with gpu.gpu_lease() as device:  # freed when the other process let go
        assert device == "cuda:0"


def test_workers_pinned_to_different_gpus_lock_their_physical_devices(monkeypatch, artifacts):
    """Each Celery gpu worker sees its own GPU as cuda:0 (CUDA_VISIBLE_DEVICES=<i>): its
    lock must name the physical GPU, or all workers would queue behind gpu-0.lock."""
    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    monkeypatch.setattr(gpu, "_cuda_device_count", lambda: 1)
    with contextlib.ExitStack() as stack:
        held = []
        for physical in ("0", "1"):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", physical)
            # the second lease must not wait for the first (timeout 0.5 s)
            held.append(stack.enter_context(gpu.gpu_lease(timeout_s=0.5, poll_s=0.1)))
        assert held == ["cuda:0", "cuda:0"]
        assert sorted(p.name for p in gpu.lock_dir().iterdir()) == ["gpu-0.lock", "gpu-1.lock"]
