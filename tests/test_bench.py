import json
import os
import queue
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
import zstandard

from megatrain.bench_parallel import ParallelLayout, stage_lines
from megatrain.bench import Checkpointed, PlainTransformer, block_params, build_model, checkpoint_blocks, main, scaling
from megatrain.config import load_config
from megatrain.model import Megabyte, StageBlock, bytes_loss
from megatrain.parallel import first_local_layer, layer_costs, pipeline_cut, stage_loads
from megatrain.train.metrics import device_name

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
GPU_CHECK = str(REPO / "bench" / "gpu_check.sh")
BENCH = [sys.executable, "-m", "megatrain.bench", "--json", "--device", "cpu"]
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")


def one_thread() -> dict[str, str]:
    # batch-1 decoding gains nothing from two threads, and loses much on a busy machine; and
    # stdout buffered as a pipe's is (unless the bench flushes), whatever this environment says
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONUNBUFFERED", None)
    return env


class TensorDevices(TorchDispatchMode):
    """The devices of every tensor that the operations run under it make."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.devices.update(t.device.type for t in tree_leaves(out) if isinstance(t, torch.Tensor))
        return out


def test_bench_prints_each_figure_as_a_json_line_naming_the_device():
    result = subprocess.run([*BENCH, "--steps", "2", "--warmup", "1", "--gen-bytes", "300", "--gen-rounds", "2",
                             "--plain-dim", "64", "--set", "model.local_layers=1", "--set", "train.grad_accum_steps=2"],
                            capture_output=True, text=True, timeout=300, env=one_thread(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["figure"] for line in lines] == ["device", *["train_step"] * 3, "train", "loader",
                                                  *["generation_round"] * 6, "generation", "report"]
    cpu = device_name(torch.device("cpu"))
    assert cpu not in ("", "cpu") and all(line["device"] == cpu for line in lines)
    assert all(line["overrides"] == ["model.local_layers=1", "train.grad_accum_steps=2"] for line in lines)
    device, steps, train, report = lines[0], lines[1:4], lines[4], lines[-1]
    assert device["datasheet_peak_tflops"] is None and device["matmul_peak_tflops"] > 0  # fp32 on a CPU
    assert [(s["step"], s["warmup"]) for s in steps] == [(1, True), (2, False), (3, False)]
    assert train["accumulation_steps"] == 2 and train["bytes_per_step"] == 2 * 4 * 256  # tiny: micro-batches of 4
    assert train["step_s"] == pytest.approx((steps[1]["step_s"] + steps[2]["step_s"]) / 2)
    assert 0 < train["mfu"] < 1 and "mfu_datasheet" not in train and train["peak_memory_gib"] > 0
    assert train["activation_checkpointing"] is False and train["recomputed_blocks"] == 0
    gen = lines[-2]
    assert [(r["generator"], r["round"]) for r in lines[6:12]] == [(g, r) for r in (1, 2)
                                                                    for g in ("cached", "uncached", "plain")]
    assert gen["gen_bytes"] == 300 and gen["gen_seq_len"] == 304  # tiny's 256 grown to whole patches
    assert gen["gen_rounds"] == 2 and gen["plain_transformer_dim"] == 64
    assert gen["gen_cached_bytes_per_s"] == max(r["bytes_per_s"] for r in lines[6:12] if r["generator"] == "cached")
    one_block = block_params(PlainTransformer(64, 1, 2, 8))
    assert abs(gen["plain_transformer_block_params"] - gen["megabyte_block_params"]) <= one_block / 2
    for key in ("train_bytes_per_s", "mfu", "matmul_peak_tflops", "loader_bytes_per_s", "loader_vs_zstd",
                "gen_cache_speedup", "gen_vs_plain_transformer"):
        assert report[key] > 0, key


def test_a_bench_cut_short_keeps_what_it_had_measured():
    """Each line is out the moment it is measured, not when the run ends (nor when a buffer fills):
    the training figure is there while the generation after it (100,000 bytes, the model rerun
    for each) is still far from done."""
    bench = subprocess.Popen([*BENCH, "--figures", "train,generation", "--steps", "1", "--warmup", "1",
                              "--generators", "uncached", "--gen-bytes", "100000"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=one_thread(), cwd=REPO)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in bench.stdout], daemon=True).start()
    figures = []
    try:
        while "train" not in figures:
            figures.append(json.loads(lines.get(timeout=120))["figure"])
    finally:
        bench.kill()
        bench.wait()
    assert figures == ["device", "train_step", "train_step", "train"]


@no_gpu
def test_bench_that_must_have_a_gpu_fails_at_once_saying_why(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--device", "cuda", "--config", TINY])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "--device cuda: torch" in error and "sees no CUDA GPU" in error and "pass --device cpu" in error


def test_model_is_built_on_the_device_itself():
    cfg = load_config(TINY).model
    with TensorDevices() as made:
        on_meta = build_model(cfg, torch.device("meta"))
    assert made.devices == {"meta"}  # made and initialised there: nothing on the CPU first
    assert all(t.is_meta for t in [*on_meta.parameters(), *on_meta.buffers()])
    torch.manual_seed(3)
    expected = Megabyte(cfg).state_dict()
    built = build_model(cfg, torch.device("cpu"), seed=3).state_dict()
    assert built.keys() == expected.keys() and all(torch.equal(built[k], expected[k]) for k in expected)
    other_seed = build_model(cfg, torch.device("cpu"), seed=4).state_dict()
    assert not torch.equal(other_seed["layers.1.attn.qkv.weight"], expected["layers.1.attn.qkv.weight"])


@pytest.mark.parametrize("count", [None, 1])
def test_activation_checkpointing_recomputes_blocks_to_the_same_gradients(count):
    """Every block, or train.checkpoint_blocks of them: the local model's first."""
    cfg = load_config(TINY).model
    plain, checkpointed = build_model(cfg, torch.device("cpu")), build_model(cfg, torch.device("cpu"))
    blocks = [i for i, m in enumerate(plain.layers) if isinstance(m, StageBlock)]
    expected = blocks if count is None else [first_local_layer(cfg) + 1]
    assert checkpoint_blocks(checkpointed, count) == expected
    assert [i for i, m in enumerate(checkpointed.layers) if isinstance(m, Checkpointed)] == expected
    x = torch.randint(0, 256, (2, cfg.seq_len))
    for model in (plain, checkpointed):
        bytes_loss(model(x), x).backward()
    grads = [[p.grad for p in model.parameters()] for model in (plain, checkpointed)]
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_scaling_rows():
    rows = scaling(torch.device("cpu"), "fp32", global_dim=128, contexts=(4096, 32768))
    assert [(r["seq_len"], r["patch_size"]) for r in rows] == [(4096, 16), (32768, 32)]
    assert all(r["us_per_byte"] > 0 and r["model_flops_per_byte"] > 0 for r in rows)


def test_parallel_figure_measures_each_layouts_step(tiny_shards, cpu_comm):
    result = subprocess.run([*BENCH, "--figures", "parallel", "--layouts", "1", "--steps", "2", "--warmup", "1",
                             "--data", str(tiny_shards), "--set", "train.global_batch_size=4"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    stage, = (line for line in lines if line["figure"] == "stage")
    run, = (line for line in lines if line["figure"] == "parallel")
    assert stage["layers"] == "0-6" and stage["flops_share"] == 1
    assert run["layout"] == "1" and run["ranks"] == 1 and run["speedup"] == 1 and run["step_s"] > 0


def test_parallel_figure_gives_each_stage_its_layers_flops_and_memory():
    run = load_config(TINY)
    cfg = run.model
    cut = pipeline_cut(cfg, "flops", 2)
    parts = cut.parts
    stages = stage_lines(run, ParallelLayout(pp=2, tp=2))
    assert [s["layers"] for s in stages] == [f"0-{parts[1] - 1}", f"{parts[1]}-6"]
    assert [s["holds"] for s in stages] == ["GlobalEmbedding, 2 global blocks, StageInput, 1 local block",
                                            "1 local block, Head"]  # the local model is cut
    loads = stage_loads(cfg, cut)
    assert [s["flops_share"] for s in stages] == pytest.approx([x / sum(loads) for x in loads])
    costs = layer_costs(cfg)
    global_blocks = sum(costs[i].params for i in (1, 2))
    assert sum(s["params_m"] for s in stages) * 1e6 == pytest.approx(sum(c.params for c in costs) - global_blocks / 2)
    local_activations = sum(c.activations for c in costs[parts[1]:])  # split over tp with the patches
    micro = run.train.micro_batch_size
    assert stages[1]["activation_mib"] * 2**20 == pytest.approx(local_activations * micro / 2 * 4)  # fp32
    # every block recomputed: each keeps its input [B, K, D_G] or [B*K, P, D_L] (the local model split
    # over tp), and the largest block's activations are back while its backward runs
    recomputing = load_config(TINY, ["train.activation_checkpointing=true", "train.grad_accum_steps=4"])
    first, last = stage_lines(recomputing, ParallelLayout(pp=2, tp=2))
    inputs = 2 * cfg.global_dim * cfg.num_patches + cfg.local_dim * cfg.seq_len / 2
    kept = costs[0].activations + costs[3].activations / 2 + inputs
    again = max(costs[1].activations, costs[4].activations / 2)
    assert first["recomputed_blocks"] == 3 and stages[0]["recomputed_blocks"] == 0
    assert first["activation_mib"] * 2**20 == pytest.approx((kept + again) * micro * 4)
    assert first["activation_mib"] < stages[0]["activation_mib"]
    # in 1F1B the first of two stages holds the kept activations of 2 micro-batches, the last of 1
    assert [first["micro_batches_in_flight"], last["micro_batches_in_flight"]] == [2, 1]
    assert first["activation_peak_mib"] * 2**20 == pytest.approx((2 * kept + again) * micro * 4)
    assert last["activation_peak_mib"] == last["activation_mib"]
    assert [s["micro_batches_in_flight"] for s in stages] == [1, 1]  # tiny: one micro-batch a step
    # at pp=3 a stage boundary falls between local block 5's branches
    assert [s["holds"] for s in stage_lines(run, ParallelLayout(pp=3))] == [
        "GlobalEmbedding, 2 global blocks, StageInput", "1 local block, local block attention (layer 5)",
        "local block mlp (layer 5), Head"]


@pytest.mark.parametrize("text, error", [("pp2xpp2", "pp/tp/dp sizes joined by x"), ("pp0", "pp/tp/dp"),
                                         ("2", "pp/tp/dp")])
def test_bad_layouts_are_named(text, error, capsys):
    with pytest.raises(SystemExit):
        main(["--figures", "parallel", "--layouts", f"1,{text}"])
    assert f"layout {text!r}: write 1, or {error}" in capsys.readouterr().err


def gpu_check(out: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", GPU_CHECK, str(out)], capture_output=True, text=True, timeout=timeout,
                          env={**one_thread(), "PYTHON": sys.executable, **env})


@no_gpu
def test_gpu_check_without_a_gpu_stops_at_once_saying_so(tmp_path):
    result = gpu_check(tmp_path)  # DEVICE defaults to cuda
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no Python here has a torch that sees a CUDA GPU" in result.stdout
    assert "gpus 0" in (tmp_path / "summary.txt").read_text()


def broken_zstandard(tmp_path: Path) -> str:
    """A folder that, first on PYTHONPATH, makes `import zstandard` fail as a missing module would."""
    shadow = tmp_path / "shadow" / "zstandard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named zstandard (this test hides it)')\n")
    return str(shadow.parent)


def test_gpu_check_names_each_missing_import(tmp_path):
    result = gpu_check(tmp_path / "out", DEVICE="cpu", PYTHONPATH=broken_zstandard(tmp_path),
                       WHEELS=str(tmp_path / "no-wheels"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "zstandard (zstandard): ImportError: No module named zstandard" in result.stdout
    assert "no wheels in" in result.stdout and "FAILED: install what is missing" in result.stdout
    assert "deepspeed (" not in result.stdout  # only what is missing


def wheel_of(package: Path, wheels: Path) -> None:
    """A wheel of an installed package's files (pip installs it as it would a downloaded one)."""
    name, version = package.name, "0.0.1"
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheels / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        for path in package.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                whl.write(path, f"{name}/{path.relative_to(package)}")
        whl.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        whl.writestr(f"{info}/RECORD", "")


def test_gpu_check_installs_what_is_missing_from_a_folder_of_wheels(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel_of(Path(zstandard.__file__).parent, wheels)
    result = gpu_check(tmp_path / "out", DEVICE="cpu", PYTHONPATH=broken_zstandard(tmp_path), WHEELS=str(wheels),
                       PARTS="none")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "zstandard (zstandard): ImportError" in result.stdout  # first missing
    assert "installing the wheels of" in result.stdout and "imports: all present" in result.stdout


def test_gpu_check_runs_every_part_on_cpu_and_keeps_each_result(tmp_path, cpu_comm):
    """bench/gpu_check.sh, the one prepared run for a GPU machine, here on CPU with the tiny config."""
    # the memory tiny needs recomputing 2 of its 4 blocks (less than with none, or with only 1)
    long = load_config(TINY, ["train.activation_checkpointing=true", "train.checkpoint_blocks=2"])
    fit_gib = (stage_lines(long, ParallelLayout())[0]["memory_mib"] + 1e-3) / 1024
    result = gpu_check(tmp_path, timeout=500, DEVICE="cpu", DS_ACCELERATOR="cpu", TEXT_CONFIG=TINY, LONG_CONFIG=TINY,
                       STEPS="2", PRETRAIN_STEPS="2", GEN_BYTES="64", PLAIN_DIM="64", HALF_BLOCKS="1",
                       FIT_MEMORY_GIB=str(fit_gib),
                       PARTS="bench-text pretrain-text bench-long generation pretrain-long bench-long-half "
                             "pretrain-long-fit")
    assert result.returncode == 0, result.stdout + result.stderr
    bench = [json.loads(line) for line in (tmp_path / "bench-text.out").read_text().splitlines()]
    assert [line["figure"] for line in bench] == ["device", *["train_step"] * 3, "train", "loader", "report"]
    steps = [json.loads(line) for line in (tmp_path / "pretrain-text.jsonl").read_text().splitlines()]
    cpu = device_name(torch.device("cpu"))
    assert [s["step"] for s in steps] == [1, 2] and all(s["device"] == cpu and s["mfu"] > 0 for s in steps)
    gen = json.loads((tmp_path / "generation.out").read_text().splitlines()[-2])
    assert gen["figure"] == "generation" and gen["gen_bytes"] == 64 and "gen_uncached_bytes_per_s" not in gen
    summary = (tmp_path / "summary.txt").read_text()
    for part in ("bench-text", "pretrain-text", "bench-long", "generation", "pretrain-long", "bench-long-half",
                 "pretrain-long-fit"):
        assert f"{part:18} ok in" in summary
    long = {part: json.loads((tmp_path / f"{part}.out").read_text().splitlines()[-2]) for part in ("bench-long",
                                                                                                  "bench-long-half")}
    assert long["bench-long"]["recomputed_blocks"] == 4 and long["bench-long-half"]["recomputed_blocks"] == 1
    assert "megabyte-1m recomputing 1 of its blocks against all 4: " in summary
    # the trainer with checkpoint_blocks auto (in FIT_MEMORY_GIB): 2 blocks, as the stages estimate says
    plan = {name: [json.loads(line) for line in (tmp_path / f"{name}.out").read_text().splitlines()]
            for name in ("plan-long", "plan-long-fit")}
    assert [line["recomputed_blocks"] for name in plan for line in plan[name] if line["figure"] == "stage"] == [4, 2]
    fit = [json.loads(line) for line in (tmp_path / "pretrain-long-fit.jsonl").read_text().splitlines()]
    assert [s["step"] for s in fit] == [1, 2]
    launched = (tmp_path / "pretrain-long-fit.out").read_text()
    assert f"train.checkpoint_blocks auto: [2] for {fit_gib:.4g} GiB a rank" in launched
    estimate = next(line for line in plan["plan-long-fit"] if line["figure"] == "stages")["max_memory_mib"] / 1024
    assert f"pretrain-long-fit: peak {fit[1]['peak_memory_gib']:.1f} GiB, estimated {estimate:.1f} GiB" in summary
    assert "megabyte-1m through the trainer recomputing 2 blocks (checkpoint_blocks auto) against all: " in summary
    assert "goal text-1b MFU >= 50% of the measured matmul peak (pretrain-text)" in summary
    assert "gpu_check: 0 part(s) not ok" in summary


def test_layer_times_gives_every_layer_and_every_two_stage_cut():
    result = subprocess.run([sys.executable, str(REPO / "bench" / "layer_times.py"), "--config", TINY, "--rounds", "1"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()  # after DeepSpeed's own line on the accelerator
    kinds = [type(m).__name__ for m in Megabyte(load_config(TINY).model).layers]
    assert [line.split()[1] for line in lines if line.split()[0].isdigit()] == kinds
    cuts = [line for line in lines if line.startswith("cut before layer")]
    assert len(cuts) == len(kinds) - 1 and all(line.endswith("x") for line in cuts)
