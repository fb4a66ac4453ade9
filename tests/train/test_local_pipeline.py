"""The local model cut across pipeline stages: tiny.yaml with cross-patch attention (each
patch's local model also attends to the previous patch's last bytes) trained on 3 and 4
stages, and on 2 stages x tp=2, gives the 1-rank run's losses and gradient norms.

tiny's local model is most of its FLOPs (73%), so the flops partition puts it on several
stages: pp=3 (0, 4, 5, 7) with a stage starting inside local block 5 (the global-to-local
input | local block 4 and block 5's attention branch | block 5's MLP branch and the Head),
pp=4 (0, 3, 5, 6, 7), and pp=2 (0, 5, 7), where each tensor-parallel rank carries its own
share of the patches from stage 0 to stage 1. By parameters, pp=2 x tp=2 cuts inside
global block 2, whose branches are tensor-parallel shards. Without cross-patch attention
the same cuts train in tests/train/test_pretrain.py (pp=2, pp=2 x dp=2, pp=2 x tp=2).
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megatrain.config import load_config
from megatrain.model import layer_specs
from megatrain.parallel import byte_input_layer, first_local_layer, pipeline_cut

from ..checkpoint.test_resume import replicas_that_differ
from .test_pretrain import TINY, batch, pretrain, relative_gaps

CROSS_PATCH = ["--set", "model.cross_patch=2"]
BY_PARAMETERS = ["--set", "parallel.partition_method=parameters"]
LAYOUTS = {  # name: (launcher, ranks, options, partition method, (stage starts, starts inside a block));
    # the global batch is 4 in all
    "pp=3": ("torchrun-env", 3, ["--pp", "3", *batch(1, 4)], "flops", ((0, 4, 5, 7), (2,))),
    "pp=4": ("torchrun-env", 4, ["--pp", "4", *batch(1, 4)], "flops", ((0, 3, 5, 6, 7), ())),
    "pp=2 x tp=2": ("slurm-env", 4, ["--pp", "2", "--tp", "2", *batch(2, 2)], "flops", ((0, 5, 7), ())),
    "pp=2 x tp=2 by parameters": ("torchrun-env", 4, ["--pp", "2", "--tp", "2", *batch(2, 2), *BY_PARAMETERS],
                                  "parameters", ((0, 2, 7), (1,))),
}


@pytest.fixture(scope="module")
def one_rank(tiny_shards, cpu_comm, tmp_path_factory):
    return pretrain("1 rank", "python", 1, CROSS_PATCH, tiny_shards, tmp_path_factory.mktemp("one"))


@pytest.mark.parametrize("name", LAYOUTS)
def test_the_local_model_on_several_stages_trains_as_on_one_rank(one_rank, name, tiny_shards, tmp_path):
    launcher, ranks, options, method, (parts, inside) = LAYOUTS[name]
    cfg = load_config(TINY, ["model.cross_patch=2"])
    cut = pipeline_cut(cfg.model, method, len(parts) - 1)
    assert (cut.parts, cut.inside) == (parts, inside)
    run = pretrain(name, launcher, ranks, [*CROSS_PATCH, *options], tiny_shards, tmp_path)
    assert max(relative_gaps(one_rank.losses(), run.losses())) < 1e-5
    grads = [[r["grad_norm"] for r in r_.steps[:4]] for r_ in (one_rank, run)]
    assert max(relative_gaps(*grads)) < 1e-5
    tag = run.dir / "ckpt" / "global_step4"
    if method == "flops":
        assert sum(start > first_local_layer(cfg.model) for start in parts[1:-1]) >= 1, "a cut inside the local model"
        # the tied local embedding lives on two stages (byte input, Head): its copies stay equal
        head = len(layer_specs(cfg.model)) - 1
        embedding = torch.load(tag / f"layer_{byte_input_layer(cfg.model):02d}-model_00-model_states.pt")["byte_embed.weight"]
        assert torch.equal(embedding, torch.load(tag / f"layer_{head:02d}-model_00-model_states.pt")["out.weight"])
    for stage in inside:  # a block cut between its branches: each stage saves its own branch
        layer = parts[stage]
        for branch, first in (("attention", "norm1.weight"), ("mlp", "norm2.weight")):
            files = sorted(tag.glob(f"layer_{layer:02d}.{branch}-model_*-model_states.pt"))
            assert files and all(first in torch.load(f, weights_only=True) for f in files), (branch, files)


DROPOUT = ["--set", "model.dropout=0.1", *batch(1, 4)]


def test_with_dropout_a_pipeline_cut_inside_a_block_draws_the_masks_of_one_rank(tiny_shards, cpu_comm, tmp_path):
    """Each layer's masks come from a seed of the micro-batch and the layer, and a block's MLP
    branch from one of its own: pp=3, cut inside local block 5, gives the 1-rank losses at the
    same micro-batches (1 x 4), also with a block of the first and last stages' activations
    checkpointed (train.checkpoint_blocks [1, 0, 1]: the recomputed masks are the forward's),
    and resumes from its step-2 checkpoint bitwise, and on one rank."""
    options = [*CROSS_PATCH, *DROPOUT, "--save-interval", "2"]
    one = pretrain("1 rank, dropout", "python", 1, options, tiny_shards, tmp_path / "one")
    pp3 = pretrain("pp=3, dropout", "torchrun-env", 3, [*options, "--pp", "3"], tiny_shards, tmp_path / "pp3")
    assert max(relative_gaps(one.losses(), pp3.losses())) < 1e-6  # other masks: 2e-5 at the first step
    recomputed = pretrain("pp=3, dropout, a block of stages 0 and 2 checkpointed", "torchrun-env", 3,
                          [*options, "--pp", "3", "--set", "train.activation_checkpointing=true",
                           "--set", "train.checkpoint_blocks=[1, 0, 1]", "--verbose"], tiny_shards, tmp_path / "ac")
    assert recomputed.losses() == pp3.losses()
    stages = ("GlobalEmbedding[0], StageBlock[1] (recomputed), StageBlock[2], StageInput[3]",
              "StageBlock[4], StageBlock[5].attention", "StageBlock[5].mlp (recomputed), Head[6]")
    for stage, layers in enumerate(stages):  # as DeepSpeed's log names them (--verbose)
        assert f"pipeline stage {stage}: {layers}\n" in recomputed.job.output, stage
    no_dropout = pretrain("1 rank", "python", 1, [*CROSS_PATCH, *batch(1, 4)], tiny_shards, tmp_path / "plain")
    assert max(relative_gaps(one.losses(), no_dropout.losses())) > 1e-4, "dropout changes the losses"
    ckpt = tmp_path / "at2"
    shutil.copytree(pp3.dir / "ckpt", ckpt)
    (ckpt / "latest").write_text("global_step2")
    resumed = pretrain("pp=3, dropout, resumed", "torchrun-env", 3, [*options, "--pp", "3", "--load", str(ckpt)],
                       tiny_shards, tmp_path / "resumed")
    assert resumed.losses(len(pp3.losses()) - 2) == pp3.losses()[2:]
    # on one rank (resharded: the random state starts anew, the micro-batch ordinal carries over)
    on_one = pretrain("1 rank from pp=3, dropout", "python", 1, [*options, "--load", str(ckpt)], tiny_shards,
                      tmp_path / "on one")
    assert max(relative_gaps(one.losses()[2:], on_one.losses(2))) < 1e-6


def test_with_layout_invariant_dropout_tensor_parallel_ranks_draw_the_masks_of_one_rank(tiny_shards, cpu_comm,
                                                                                        tmp_path):
    """`parallel.layout_invariant_dropout`: every tp rank draws whole masks and keeps its slice,
    so pp=2 x tp=2 cut inside the local model (each rank's patches, with their halo) and
    cut inside global block 2 (each rank's heads) give the 1-rank losses with dropout, the
    replicated weights staying bitwise equal over tp, also with activation checkpointing
    (bitwise), and one rank resumed from the first's step-2 checkpoint goes on with the
    same masks."""
    options = [*CROSS_PATCH, "--set", "model.dropout=0.1", "--set", "parallel.layout_invariant_dropout=true",
               "--save-interval", "2"]
    one = pretrain("1 rank, dropout", "python", 1, [*options, *batch(2, 2)], tiny_shards, tmp_path / "one")
    no_dropout = pretrain("1 rank", "python", 1, [*CROSS_PATCH, *batch(2, 2)], tiny_shards, tmp_path / "plain")
    assert max(relative_gaps(one.losses(), no_dropout.losses())) > 1e-4, "dropout changes the losses"
    runs = {}
    for name in ("pp=2 x tp=2", "pp=2 x tp=2 by parameters"):
        launcher, ranks, layout, *_ = LAYOUTS[name]
        runs[name] = pretrain(f"{name}, dropout", launcher, ranks, [*options, *layout], tiny_shards, tmp_path / name)
        assert max(relative_gaps(one.losses(), runs[name].losses())) < 1e-5, name  # own streams: 3.7e-4
        assert replicas_that_differ(runs[name].dir / "ckpt" / "global_step4") == []
    launcher, ranks, layout, *_ = LAYOUTS["pp=2 x tp=2"]
    recomputed = pretrain("pp=2 x tp=2, dropout, checkpointed", launcher, ranks,
                          [*options, *layout, "--set", "train.activation_checkpointing=true"], tiny_shards,
                          tmp_path / "ac")
    assert recomputed.losses() == runs["pp=2 x tp=2"].losses()
    ckpt = tmp_path / "at2"
    shutil.copytree(runs["pp=2 x tp=2"].dir / "ckpt", ckpt)
    (ckpt / "latest").write_text("global_step2")
    on_one = pretrain("1 rank from pp=2 x tp=2, dropout", "python", 1, [*options, *batch(2, 2), "--load", str(ckpt)],
                      tiny_shards, tmp_path / "on one")
    assert max(relative_gaps(one.losses()[2:], on_one.losses(2))) < 1e-5
