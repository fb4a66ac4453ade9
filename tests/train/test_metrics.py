import json

import pytest
import torch

from megatrain.train.metrics import MetricsLog, datasheet_bf16_tflops, device_name


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA L4", 121.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA A10", 125.0),
    ("NVIDIA B200", 2250.0), ("NVIDIA A10G", None), ("Tesla T4", None), ("AMD EPYC 7B13", None),
])
def test_datasheet_peak_by_device_name(name, tflops):
    assert datasheet_bf16_tflops(name) == tflops


def test_metrics_lines_name_the_device_and_both_mfus(tmp_path):
    path = tmp_path / "m.jsonl"
    log = MetricsLog(str(path), log_interval=1, total_steps=2, flops_per_byte_per_device=1e6, peak_tflops=2.0,
                     device="NVIDIA H200", datasheet_tflops=4.0)
    log.write({"step": 1, "samples": 4, "bytes_per_s": 1e6})  # 1 TFLOP/s of model FLOPs
    log.close()
    record = json.loads(path.read_text())
    assert record["device"] == "NVIDIA H200"
    assert record["mfu"] == pytest.approx(0.5) and record["mfu_datasheet"] == pytest.approx(0.25)

    cpu_path = tmp_path / "cpu.jsonl"
    cpu = MetricsLog(str(cpu_path), 1, 2, 1e6, 2.0, device=device_name(torch.device("cpu")))  # no datasheet peak
    cpu.write({"step": 1, "samples": 4, "bytes_per_s": 1e6})
    cpu.close()
    record = json.loads(cpu_path.read_text())
    assert "mfu_datasheet" not in record and record["mfu"] == pytest.approx(0.5)

