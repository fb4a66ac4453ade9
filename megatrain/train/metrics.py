"""Per-step training metrics: the JSONL file of the contract, a console line, DeepSpeed's monitor."""

from __future__ import annotations

import json
import math
import platform
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: allocated on the GPU, else its RSS high-water mark."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, seconds: float = 0.5) -> float:
    """The device's dense matmul throughput in TFLOP/s, the peak that MFU is measured against.

    Its matrices come from a generator of its own: rank 0 alone measures, and drawing from
    the training streams would give it other dropout masks than its tensor-parallel peers."""
    n = 512 if device.type == "cpu" else 8192
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    start, reps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


# Dense (no sparsity) bf16 tensor-core peaks of NVIDIA's datasheets, TFLOP/s per GPU, matched
# in order against torch.cuda.get_device_name(): the first match wins, so "H100 NVL" and
# "H100 PCIe" come before the H100 (SXM) that would match them too.
DATASHEET_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bGH200\b", 989.0),
    (r"\bH200 NVL\b", 835.0),
    (r"\bH200\b", 989.0),  # SXM
    (r"\bH100 NVL\b", 835.0),
    (r"\bH100 PCIe\b", 756.0),
    (r"\bH100\b", 989.0),  # SXM5: "NVIDIA H100 80GB HBM3"
    (r"\bB200\b", 2250.0),
    (r"\bA100\b", 312.0),  # SXM4 and PCIe alike
    (r"\bA10\b", 125.0),  # not A10G, whose datasheet gives no bf16 figure
    (r"\bL40S\b", 362.0),
    (r"\bL40\b", 181.0),
    (r"\bL4\b", 121.0),
)


def datasheet_bf16_tflops(name: str) -> float | None:
    """The datasheet's dense bf16 peak of the device called `name`; None for one not in the table."""
    return next((tflops for pattern, tflops in DATASHEET_BF16_TFLOPS if re.search(pattern, name)), None)


def device_name(device: torch.device) -> str:
    """What the device is, for every report: the GPU's name, or the CPU's model name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type != "cpu":
        return device.type
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "cpu"


class MetricsLog:
    """What rank 0 reports after every optimizer step.

    One JSON object per step appended to `path` (flushed, so a crash loses nothing),
    with the device's name, the model TFLOP/s per device and MFU added: against `peak_tflops`,
    and as `mfu_datasheet` against `datasheet_tflops` where that is known; a console
    line every `log_interval` steps; the numbers to DeepSpeed's monitor (TensorBoard /
    CSV / W&B) when the config switches one on.
    """

    CONSOLE = (("loss", "loss {:.4f}"), ("bpb", "bpb {:.4f}"), ("val_bpb", "val_bpb {:.4f}"),
               ("lr", "lr {:.2e}"), ("grad_norm", "grad {:.3f}"), ("bytes_per_s", "{:,.0f} B/s"),
               ("mfu", "mfu {:.2%}"), ("peak_memory_gib", "mem {:.2f} GiB"))

    def __init__(self, path: str | None, log_interval: int, total_steps: int, flops_per_byte_per_device: float,
                 peak_tflops: float, device: str, datasheet_tflops: float | None = None,
                 monitor: Any = None) -> None:
        if path:  # like --save, --metrics runs/x/metrics.jsonl makes runs/x
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.file = open(Path(path), "a") if path else None
        self.log_interval, self.total_steps = log_interval, total_steps
        self.flops_per_byte_per_device, self.peak_tflops = flops_per_byte_per_device, peak_tflops
        self.device, self.datasheet_tflops = device, datasheet_tflops
        self.monitor = monitor if monitor is not None and monitor.enabled else None

    def write(self, record: dict[str, Any]) -> None:
        step = record["step"]
        tflops = self.flops_per_byte_per_device * record["bytes_per_s"] / 1e12
        record = {**record, "device": self.device, "tflops": tflops, "mfu": tflops / self.peak_tflops}
        if self.datasheet_tflops:
            record["mfu_datasheet"] = tflops / self.datasheet_tflops
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if step % max(1, self.log_interval) == 0 or step == self.total_steps or "val_bpb" in record:
            fields = [fmt.format(record[key]) for key, fmt in self.CONSOLE if key in record]
            print(f"step {step}/{self.total_steps} | " + " | ".join(fields), flush=True)
        if self.monitor:
            self.monitor.write_events([(f"Train/Samples/{key}", float(value), record["samples"])
                                       for key, value in record.items()
                                       if key not in ("step", "samples") and isinstance(value, (int, float))])

    def close(self) -> None:
        if self.file:
            self.file.close()


def bits_per_byte(loss_nats: float) -> float:
    return loss_nats / math.log(2)
