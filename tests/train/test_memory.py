"""What a run holds on each rank (megatrain.train.memory): the optimizer state against what
DeepSpeed allocates, each stage's activations in flight, the fewest recomputed blocks that fit,
and train.checkpoint_blocks: auto in a real run."""

from __future__ import annotations

import gc
import os
import re

import pytest
import torch

from megatrain.config import ConfigError, load_config
from megatrain.parallel import Layout, pieces
from megatrain.train.memory import AUTO_SHARE, checkpoint_counts, describe_auto, stage_memories

from ..distributed import REPO, launch, run_ranks

TINY = str(REPO / "configs" / "tiny.yaml")

DEEPSPEED_BUCKET = 5e8  # DeepSpeed's default reduce_bucket_size, in values
WIDE = ["model.global_dim=512", "model.local_dim=256", "model.global_heads=4", "model.local_heads=4",
        "train.micro_batch_size=2"]  # 8M parameters: the optimizer's tensors dwarf the rest


def live_tensor_bytes() -> int:
    """The bytes of every tensor storage this process holds (the parameters' gradients included)."""
    storages = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
            for t in (obj, obj.grad) if isinstance(obj, torch.nn.Parameter) else (obj,):
                if t is not None:
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def optimizer_bytes(rank: int, size: int, precision: str) -> tuple[float, list[float]]:
    """A stage's parameters, and the tensor bytes it holds as its gradients are reduced and as its
    optimizer steps (the second step: Adam's moments exist), at dp = size."""
    import deepspeed
    from deepspeed.runtime.pipe.schedule import OptimizerStep, ReduceGrads

    from megatrain.parallel import MegabytePipeline, plan_layout
    from megatrain.train.ds_config import deepspeed_config
    from megatrain.train.optim import build_optimizer, lr_schedule

    deepspeed.init_distributed("gloo", verbose=False)
    cfg = load_config(TINY, [f"train.precision={precision}", *WIDE])
    layout = plan_layout(cfg, size)
    model = MegabytePipeline(cfg.model, layout, 0)
    params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.train),
                                      lr_scheduler=lr_schedule(cfg.train, 10), config=deepspeed_config(cfg, layout))
    held: list[float] = []

    def measuring(instruction):
        run = engine._INSTRUCTION_MAP[instruction]

        def measured(engine, **kwargs):
            gc.collect()
            held.append(live_tensor_bytes())
            run(engine, **kwargs)
        return measured

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, **{i: measuring(i) for i in (ReduceGrads, OptimizerStep)}}
    x = torch.randint(0, 256, (2, cfg.model.seq_len))
    batches = iter([(x, x)] * 2)
    engine.train_batch(batches)
    engine.train_batch(batches)
    return params, held[-2:]


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_the_optimizer_state_estimate_is_what_deepspeed_allocates(precision, cpu_comm):
    """ZeRO-1 at dp=2: bf16 holds 8 + 12/2 bytes a parameter (its bf16 weight and gradient, the fp32
    accumulated gradient; the master weight and moments halved); fp32 the weight and gradient
    whole, the optimizer state halved and one 500M-value reduction bucket of DeepSpeed's."""
    (params, held), _ = run_ranks(optimizer_bytes, 2, precision, timeout=300)
    stage, = stage_memories(load_config(TINY, [f"train.precision={precision}", *WIDE]), Layout(1, 1, 2))
    estimate, counted = stage.state_mib * 2**20, stage.params
    assert params < counted < params * 1.01  # the cost model counts the tied byte embedding twice
    if precision == "bf16":
        assert held[0] == held[1]  # nothing comes or goes while the gradients are reduced
        assert estimate == pytest.approx(counted * 14)
    else:
        assert estimate == pytest.approx(counted * 16 + DEEPSPEED_BUCKET * 4)  # the reduced gradient's half beside the whole
    # the rest of the process's tensors (the batch, the pipeline's buffers, the norms' statistics) are small
    assert max(held) <= estimate < max(held) * 1.03



RECOMPUTING = ["train.precision=bf16", "train.activation_checkpointing=true", "train.grad_accum_steps=4"]
PP2_DP2 = Layout(pp=2, tp=1, dp=2)


def test_a_stage_holds_its_optimizer_state_and_the_activations_in_flight():
    """bf16 at pp=2 x dp=2 with 4 micro-batches a step: 8 + 12/dp bytes a parameter, 2 bytes an
    activation value (fp32: 4), stage 0 holding 2 micro-batches' activations, stage 1 one."""
    bf16, fp32 = (stage_memories(load_config(TINY, [*RECOMPUTING, f"train.precision={p}"]), PP2_DP2)
                  for p in ("bf16", "fp32"))
    assert [s.in_flight for s in bf16] == [2, 1]
    for stage, wide in zip(bf16, fp32):
        assert stage.state_mib * 2**20 == pytest.approx(stage.params * (8 + 12 / 2))
        for count in (None, 0, 1):
            recomputed = stage.recomputed(count)
            assert wide.activation_peak_mib(recomputed) == 2 * stage.activation_peak_mib(recomputed)
            assert stage.memory_mib(recomputed) == stage.state_mib + stage.activation_peak_mib(recomputed)
    first = bf16[0]
    one_in_flight = stage_memories(load_config(TINY, [*RECOMPUTING, "train.grad_accum_steps=1"]), PP2_DP2)[0]
    assert one_in_flight.in_flight == 1
    assert first.activation_peak_mib([]) == pytest.approx(2 * one_in_flight.activation_peak_mib([]))


def test_each_stage_fits_with_the_fewest_blocks_recomputed():
    for stage in stage_memories(load_config(TINY, RECOMPUTING), PP2_DP2):
        blocks = len(stage.recomputed(None))
        memory = [stage.memory_mib(stage.recomputed(n)) for n in range(blocks + 1)]
        for budget in memory:
            assert stage.fewest_recomputed(budget) == min(n for n, m in enumerate(memory) if m <= budget)
        assert stage.fewest_recomputed(min(memory) - 1e-3) is None
    first = stage_memories(load_config(TINY, RECOMPUTING), PP2_DP2)[0]
    assert first.memory_mib(first.recomputed(2)) < first.memory_mib([])  # recomputing pays on stage 0


def test_checkpoint_counts_per_stage_and_auto_for_a_device():
    """A count for every stage, a list, null; auto: the fewest that fit in 90% of the device's memory,
    or in train.checkpoint_memory_gib."""
    counts = lambda blocks, memory=None: checkpoint_counts(  # noqa: E731
        load_config(TINY, [*RECOMPUTING, f"train.checkpoint_blocks={blocks}"]), PP2_DP2, memory)
    assert counts(1) == (1, 1) and counts("[2, 0]") == (2, 0) and counts("null") == (None, None)
    first = stage_memories(load_config(TINY, RECOMPUTING), PP2_DP2)[0]
    two = first.memory_mib(first.recomputed(2)) / 1024
    assert counts("auto", memory=(two + 1e-9) / AUTO_SHARE)[0] == 2
    assert counts("auto", memory=two + 1e-9)[0] == 3  # 90% of it is not enough for 2
    assert checkpoint_counts(load_config(TINY, [*RECOMPUTING, "train.checkpoint_blocks=auto",
                                                f"train.checkpoint_memory_gib={two + 1e-9}"]), PP2_DP2, 1e6)[0] == 2
    with pytest.raises(ConfigError, match=re.escape("auto needs the device's memory: set train.checkpoint_memory_gib")):
        counts("auto")
    with pytest.raises(ConfigError, match=re.escape("lists 3 counts, one per pipeline stage, but the pipeline has 2")):
        counts("[1, 1, 1]")
    with pytest.raises(ConfigError, match="train.checkpoint_memory_gib: is 4.0, but checkpoint_blocks is not auto"):
        load_config(TINY, [*RECOMPUTING, "train.checkpoint_blocks=1", "train.checkpoint_memory_gib=4"])


def test_auto_says_what_it_chose_and_warns_where_no_count_fits():
    run = load_config(TINY, [*RECOMPUTING, "train.checkpoint_blocks=auto"])
    first, last = stage_memories(run, PP2_DP2)
    budget = (last.memory_mib(last.recomputed(None)) + 1e-3) / 1024  # stage 1 fits, stage 0 not even recomputing all
    assert first.memory_mib(first.recomputed(None)) / 1024 > budget
    fits = last.fewest_recomputed(budget * 1024)
    lines = describe_auto(run, PP2_DP2, (None, fits), budget)
    assert lines[0] == f"train.checkpoint_blocks auto: [3, {fits}] for {budget:.4g} GiB a rank"
    assert lines[1].startswith("warning: pipeline stage 0 needs ") and "even recomputing every block" in lines[1]
    assert lines[2] == f"  stage 1: {fits} of 1 blocks recomputed, " \
                       f"{last.memory_mib(last.recomputed(fits)) / 1024:.4g} GiB by the estimate"


def test_a_run_with_auto_recomputes_what_fits_in_the_memory_of_its_ranks(tiny_shards, cpu_comm, tmp_path):
    """pp=2 under the deepspeed launcher: on a CPU a rank's memory is the machine's shared by its 2 local
    ranks (agreed by all ranks: the smallest), ample for tiny: nothing is recomputed."""
    job = launch("deepspeed", 2, ["--config", TINY, "--data", str(tiny_shards), "--train-steps", "1", "--pp", "2",
                                  "--set", "train.activation_checkpointing=true", "--set", "train.checkpoint_blocks=auto",
                                  "--verbose"], tmp_path)
    assert job.returncode == 0, job.output[-4000:]
    rank_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 / 2**30
    assert f"train.checkpoint_blocks auto: [0, 0] for {AUTO_SHARE * rank_gib:.4g} GiB a rank" in job.output
    assert "(recomputed)" not in job.output  # the stage log (--verbose) marks none
    assert "pipeline stage 0: GlobalEmbedding[0], StageBlock[1], StageBlock[2]" in job.output


def test_layout_invariant_dropout_counts_the_attention_weights_it_keeps():
    """Its masks are a value each, and attention over many keys keeps its weights
    (tests/parallel/test_cost.py measures both)."""
    dropping = ["model.dropout=0.1", "train.precision=bf16", "model.seq_len=2048"]  # 256 patches: SDPA's, else
    plain = load_config(TINY, dropping)
    whole = load_config(TINY, [*dropping, "parallel.layout_invariant_dropout=true"])
    values = {flag: sum(p.cost.activations for p in pieces(plain.model, flag)) for flag in (False, True)}
    assert values[True] > 1.2 * values[False]
    (a,), (b,) = (stage_memories(run, Layout(1, 1, 1)) for run in (plain, whole))
    micro_bytes = plain.train.micro_batch_size * 2 / 2**20
    assert b.activation_mib([]) - a.activation_mib([]) == pytest.approx((values[True] - values[False]) * micro_bytes)
