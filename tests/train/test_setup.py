"""What a run is built from: options, DeepSpeed config, optimizer groups, LR schedule (no processes)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megatrain.data.format import CorruptShardError
from megatrain.config import ConfigError, config_to_dict, load_config
from megatrain.model import GlobalEmbedding, Head, StageInput
from megatrain.parallel import Layout, plan_layout, reference_model
from deepspeed.utils.config import get_timers_config

from megatrain.train import deepspeed_config, lr_at, param_groups, parse_args, resolve_config
from megatrain.train.optim import build_optimizer
from megatrain.train.trainer import as_batches
from megatrain.train.distributed import discover_launcher
from megatrain.scoring.pipeline import evaluation_config

from ..distributed import REPO

TINY = str(REPO / "configs" / "tiny.yaml")


def test_command_line_options_override_the_config():
    args = parse_args(["--config", TINY, "--data", "/d", "--pp", "2", "--tp", "2", "--train-steps", "7",
                       "--seed", "3", "--save-interval", "5", "--set", "train.lr=1e-3", "--local_rank=1"])
    cfg = resolve_config(args)
    assert (cfg.data.path, cfg.parallel.pp, cfg.parallel.tp) == ("/d", 2, 2)
    assert (cfg.train.train_steps, cfg.train.seed, cfg.train.save_interval, cfg.train.lr) == (7, 3, 5, 1e-3)
    assert resolve_config(parse_args(["--config", TINY, "--data", "/d"])).train.train_steps == 100


def test_data_is_required():
    with pytest.raises(ConfigError, match="no training data"):
        resolve_config(parse_args(["--config", TINY]))


def test_deepspeed_config_from_yaml():
    cfg = load_config(TINY, ["train.grad_accum_steps=3", "train.monitor=[csv, tensorboard]",
                             "train.monitor_dir=/m", "parallel.timeout_s=30"])
    ds = deepspeed_config(cfg, Layout(pp=2, tp=1, dp=2))
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (24, 4, 3)
    assert ds["zero_optimization"] == {"stage": 1, "elastic_checkpoint": True} and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": False} and "data_types" not in ds  # tiny trains in fp32
    assert ds["csv_monitor"]["enabled"] and ds["tensorboard"]["output_path"] == "/m"
    assert cfg.parallel.timeout_s == 30.0


def test_global_batch_size_sets_the_accumulation_at_any_data_parallel_size():
    cfg = load_config(TINY, ["train.micro_batch_size=2", "train.global_batch_size=16"])
    for dp, accum in ((1, 8), (2, 4), (8, 1)):
        ds = deepspeed_config(cfg, Layout(pp=1, tp=1, dp=dp))
        assert (ds["train_batch_size"], ds["gradient_accumulation_steps"]) == (16, accum)


def test_evaluation_runs_micro_batches_of_its_own_whatever_the_training_batch():
    saved = config_to_dict(load_config(TINY, ["train.micro_batch_size=6", "train.global_batch_size=48"]))
    cfg = evaluation_config(saved, pp=1, tp=1, micro_batch_size=2, source="ckpt")
    layout = plan_layout(cfg, 5)  # training could not split 48 sequences over 5 ranks; evaluating can
    ds = deepspeed_config(cfg, layout)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (10, 2, 1)


def test_bf16_accumulates_gradients_in_fp32_and_user_keys_win():
    cfg = load_config(TINY, ["train.precision=bf16",
                             'train.deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": false}}'])
    ds = deepspeed_config(cfg, Layout(1, 1, 1))
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"}
    assert ds["zero_optimization"] == {"stage": 1, "elastic_checkpoint": True, "reduce_bucket_size": 1000}
    assert ds["bf16"] == {"enabled": False}


def test_deepspeeds_throughput_timer_is_off():
    """On, it synchronizes the device at every micro-batch; megatrain times steps itself."""
    ds = deepspeed_config(load_config(TINY), Layout(1, 1, 1))
    assert not get_timers_config(ds).enabled  # as DeepSpeed's engine reads it


def test_adamw_is_not_fused_on_cpu():
    """Fused (one kernel for all parameters) where the parameters are on CUDA; not here."""
    cfg = load_config(TINY)
    assert build_optimizer(nn.Linear(2, 2), cfg.train).defaults["fused"] is None


def test_batches_travel_as_bytes_and_are_widened_on_the_device():
    """uint8 from the loader; int64 on arrival (embeddings index with it), the same bytes."""
    x = torch.tensor([[0, 7, 255]], dtype=torch.uint8)
    guard = SimpleNamespace(corrupt=None)  # the one field of the step guard the batches set
    (inputs, targets), = as_batches(iter([x]), (1, 3), torch.device("cpu"), guard)
    assert inputs is targets and inputs.dtype == torch.int64 and inputs.tolist() == [[0, 7, 255]]
    assert guard.corrupt is None


def test_a_corrupt_shard_gives_zeros_of_the_batch_shape_and_is_reported_to_the_guard():
    """The rank goes on through the step (the others wait for its activations); the guard vetoes it."""
    def micro_batches():
        yield torch.full((2, 4), 9, dtype=torch.uint8)
        raise CorruptShardError("train-00001.arrow", "truncated")

    guard = SimpleNamespace(corrupt=None)
    batches = as_batches(micro_batches(), (2, 4), torch.device("cpu"), guard)
    first, _ = next(batches)
    assert first.tolist() == [[9] * 4] * 2 and guard.corrupt is None
    second, _ = next(batches)
    assert second.tolist() == [[0] * 4] * 2 and second.dtype == torch.int64
    assert guard.corrupt.path == "train-00001.arrow"


def test_weight_decay_only_on_matrices():
    model = reference_model(load_config(TINY, ["model.conv_encoder=true"]).model, seed=0)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    decayed = {id(p) for p in decay["params"]}
    embed, head = model.layers[0], model.layers[-1]
    assert isinstance(embed, GlobalEmbedding) and isinstance(head, Head)
    stage_input = next(m for m in model.layers if isinstance(m, StageInput))
    never = [embed.byte_embed.weight, embed.pos_embed, embed.pad, stage_input.byte_embed.weight,
             stage_input.pad, head.out.weight, head.norm.weight, head.norm.bias]
    assert not any(id(p) in decayed for p in never)
    linears = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d)) and m is not head.out]
    assert all(id(p) in decayed for p in linears) and len(decayed) == len(linears)
    assert len(decayed) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_warms_up_then_decays_to_min_lr():
    t = replace(load_config(TINY).train, lr=1.0, min_lr=0.1, warmup_steps=10, decay_power=2.0)
    assert [lr_at(s, t, 110) for s in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(60, t, 110) == pytest.approx(0.1 + 0.9 * 0.25)
    assert lr_at(110, t, 110) == pytest.approx(0.1) and lr_at(200, t, 110) == pytest.approx(0.1)
    assert lr_at(1, replace(t, warmup_steps=0), 10) == pytest.approx(0.1 + 0.9 * 0.81)


@pytest.mark.parametrize("env, launcher, expected", [
    ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "deepspeed", {}),
    ({"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "deepspeed", {"LOCAL_RANK": "0"}),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"}, "mpi", {}),  # left to DeepSpeed's discovery
    ({"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42",
      "MASTER_ADDR": "node1"}, "srun",
     {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node1", "MASTER_PORT": "29542"}),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}, "python",
     {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),  # sbatch, not srun
    ({}, "python", {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}),
])
def test_each_launcher_is_recognised(env, launcher, expected):
    """The launcher, and exactly the variables it fills in (`expected`): nothing else changes."""
    given = dict(env)
    assert discover_launcher(env) == launcher
    if launcher == "python":  # a free port of the moment
        assert env.pop("MASTER_PORT").isdigit()
    assert env == {**given, **expected}
