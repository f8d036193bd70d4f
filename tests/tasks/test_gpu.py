"""GPU leases: never two holders of one device, a waiter gets the first device freed, and
the CPU where there is no CUDA. CUDA is faked by the device count; the locks are real."""

from __future__ import annotations

import contextlib
import os
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
    monkeypatch.delenv("LORAFLOW_TASKS_PER_GPU", raising=False)  # one task per GPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(gpu, "_cuda_device_count", lambda: 2)
    return artifacts / "locks"


def slot_locks(folder) -> list[str]:
    """The slot lock files (not the whole-device gates)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".whole.lock"))


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
    assert slot_locks(two_gpus) == ["gpu-0.lock", "gpu-1.lock"]


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
    monkeypatch.delenv("LORAFLOW_TASKS_PER_GPU", raising=False)
    monkeypatch.setattr(gpu, "_cuda_device_count", lambda: 1)
    with contextlib.ExitStack() as stack:
        held = []
        for physical in ("0", "1"):
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", physical)
            # the second lease must not wait for the first (timeout 0.5 s)
            held.append(stack.enter_context(gpu.gpu_lease(timeout_s=0.5, poll_s=0.1)))
        assert held == ["cuda:0", "cuda:0"]
        assert slot_locks(gpu.lock_dir()) == ["gpu-0.lock", "gpu-1.lock"]


# --- k slots per device (LORAFLOW_TASKS_PER_GPU) -----------------------------------------

CONTENDER = textwrap.dedent("""
    import sys
    from tasks import gpu
    gpu._cuda_device_count = lambda: 1  # one (fake) CUDA device; the locks are real
    try:
        with gpu.gpu_lease(timeout_s=float(sys.argv[1]), poll_s=0.05) as device:
            print("held", device, flush=True)
            sys.stdin.readline()
    except TimeoutError:
        print("timeout", flush=True)
""")


def contender(timeout_s: float, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CONTENDER, str(timeout_s)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_k_plus_one_processes_contend_for_k_slots_and_only_k_hold_one(k, artifacts, monkeypatch):
    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    env = {**os.environ, "LORAFLOW_TASKS_PER_GPU": str(k)}
    procs = [contender(1.0, env) for _ in range(k + 1)]  # k hold; the last waits 1 s
    try:
        first = [p.stdout.readline().split() for p in procs]
        assert sorted(line[0] for line in first) == ["held"] * k + ["timeout"]
        assert {tuple(line) for line in first if line[0] == "held"} == {("held", "cuda:0")}
        slot_files = ["gpu-0.lock"] + [f"gpu-0.{j}.lock" for j in range(1, k)]
        assert slot_locks(gpu.lock_dir()) == sorted(slot_files)
        # one holder lets go: a newcomer gets its slot
        holder = next(p for p, line in zip(procs, first, strict=True) if line[0] == "held")
        holder.communicate("\n", timeout=10)
        late = contender(1.0, env)
        procs.append(late)
        assert late.stdout.readline().split() == ["held", "cuda:0"]
    finally:
        for p in procs:
            if p.poll() is None:
                p.communicate("\n", timeout=10)


@pytest.fixture
def one_gpu_two_slots(monkeypatch, artifacts):
    monkeypatch.delenv("LORAFLOW_DEVICE", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("LORAFLOW_WHOLE_GPU", raising=False)
    monkeypatch.setenv("LORAFLOW_TASKS_PER_GPU", "2")
    monkeypatch.setattr(gpu, "_cuda_device_count", lambda: 1)
    monkeypatch.setattr(gpu, "_device_bytes", lambda: [gpu.slots.Gpu(0, 16 << 30, 16 << 30)])


def test_a_whole_device_lease_holds_every_slot(one_gpu_two_slots):
    with gpu.gpu_lease(whole_device=True) as device:
        assert device == "cuda:0"
        with pytest.raises(TimeoutError), gpu.gpu_lease(timeout_s=0.2, poll_s=0.05):
            pass
    with gpu.gpu_lease() as a, gpu.gpu_lease() as b:  # released: both slots free again
        assert a == b == "cuda:0"


def test_a_whole_device_waiter_drains_the_device_and_keeps_newcomers_off(one_gpu_two_slots):
    got: dict[str, float] = {}

    def whole():
        with gpu.gpu_lease(whole_device=True, timeout_s=10, poll_s=0.05):
            got["whole_at"] = time.monotonic()

    with gpu.gpu_lease():  # one of the two slots is busy
        w = threading.Thread(target=whole)
        w.start()
        time.sleep(0.3)
        assert "whole_at" not in got  # it waits for the busy slot
        # a slot is free, but the waiting whole-device lease closed the gate
        with pytest.raises(TimeoutError), gpu.gpu_lease(timeout_s=0.2, poll_s=0.05):
            pass
        released_at = time.monotonic()
    w.join(10)
    assert got["whole_at"] >= released_at


def test_whole_device_lease_times_out_when_the_device_stays_busy(one_gpu_two_slots):
    with gpu.gpu_lease():
        with (pytest.raises(TimeoutError, match="did not drain"),
              gpu.gpu_lease(whole_device=True, timeout_s=0.2, poll_s=0.05)):
            pass
        with gpu.gpu_lease(timeout_s=0.5) as second:  # the failed waiter let go of the gate
            assert second == "cuda:0"


def test_a_variant_larger_than_its_share_takes_the_whole_device(one_gpu_two_slots):
    # 16 GiB and k = 2: a share is 8 GiB, of which each process's context takes 1
    assert not gpu.needs_whole_device(6 << 30, 2)
    assert gpu.needs_whole_device(8 << 30, 2)
    assert not gpu.needs_whole_device(100 << 30, 1)  # k = 1: every lease is a whole device
    with gpu.gpu_lease(peak_bytes=lambda: 8 << 30):
        with pytest.raises(TimeoutError), gpu.gpu_lease(timeout_s=0.2, poll_s=0.05):
            pass
    with gpu.gpu_lease(peak_bytes=lambda: 1 << 30), gpu.gpu_lease(timeout_s=0.5):
        pass  # a small one leaves the second slot free


def test_auto_in_the_lease_fits_the_total_memory_not_what_is_free_now(monkeypatch, artifacts):
    monkeypatch.setenv("LORAFLOW_TASKS_PER_GPU", "auto")
    monkeypatch.setattr(gpu, "_device_bytes", lambda: [gpu.slots.Gpu(0, 80 << 30, 1 << 30)])
    monkeypatch.setattr(gpu.slots, "task_bytes", lambda artifacts=None: 20 << 30)
    monkeypatch.setattr(gpu.slots.os, "cpu_count", lambda: 64)
    assert gpu.lease_slots() == 3  # floor(0.9 x 80 / 20), whatever runs at the moment
