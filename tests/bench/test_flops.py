"""bench.flops: the 6 x params x tokens formula and the peak table's name matching."""

from __future__ import annotations

import pytest

from bench.flops import achieved_tflops, peak_bf16_tflops, throughput_rows


def test_achieved_tflops_is_six_params_tokens_over_seconds():
    assert achieved_tflops(10**9, 2048, 0.5) == pytest.approx(6 * 10**9 * 2048 / 0.5 / 1e12)


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H200", ("H200", 989.0)),
    ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.0)),
    ("NVIDIA H100 PCIe", None),  # a slower card than the SXM figure: no guess
    ("NVIDIA A100-SXM4-80GB", ("A100", 312.0)),
    ("NVIDIA L4", ("L4", 121.0)),
    ("NVIDIA L40S", None),
    ("NVIDIA A10G", ("A10G", 125.0)),
    ("Tesla T4", None),
    (None, None),
])
def test_peak_is_known_only_for_listed_cards(name, expected):
    assert peak_bf16_tflops(name) == expected


def test_throughput_rows_cover_full_fine_tuning_only():
    step = {"model": "m", "precision": "bf16", "ms_per_step": 10.0, "params_total": 1000,
            "tokens_per_step": 2048}
    results = {"machine": {"device_name": "NVIDIA H200"},
               "train_step": [{**step, "method": "full_finetune"}, {**step, "method": "lora"}]}
    (row,) = throughput_rows(results)
    assert row["tflops"] == pytest.approx(achieved_tflops(1000, 2048, 0.01))
    assert row["share_of_peak"] == pytest.approx(row["tflops"] / 989.0)
    results["machine"]["device_name"] = "Some GPU"
    assert throughput_rows(results)[0]["peak_tflops"] is None
