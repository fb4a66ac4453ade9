from pathlib import Path

import pytest

from megatrain.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["tiny", "demo", "megabyte-text-1b", "megabyte-1m", "megabyte-imagenet64", "megabyte-audio"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml")
    assert cfg.model.seq_len % cfg.model.patch_size == 0


def test_paper_text_recipe():
    cfg = load_config(REPO / "configs" / "megabyte-text-1b.yaml")
    m, t = cfg.model, cfg.train
    assert (m.seq_len, m.patch_size, m.global_dim, m.global_layers) == (8192, 8, 2048, 14)
    assert (m.local_dim, m.local_layers, m.dropout, m.init_std) == (1024, 18, 0.1, 0.006)
    assert [t.sequences_per_step(dp) for dp in (1, 2, 4, 8)] == [48] * 4  # the paper's batch at any dp
    assert (t.lr, t.betas, t.weight_decay, t.grad_clip, t.warmup_steps) == (2e-4, (0.9, 0.98), 0.1, 1.0, 500)
    assert load_config(REPO / "configs" / "megabyte-1m.yaml").model.seq_len == 1_048_576


def test_overrides_are_typed(tmp_path):
    path = write(tmp_path, "model:\n  seq_len: 64\n  patch_size: 4\n  global_dim: 32\n")
    cfg = load_config(path, ["train.lr=1e-3", "model.global_layers=3", "train.betas=[0.8, 0.9]",
                             "model.conv_encoder=true", "data.path=/x"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.model.global_layers == 3 and cfg.model.conv_encoder is True
    assert cfg.train.betas == (0.8, 0.9) and cfg.data.path == "/x"


def test_mid_stages_from_yaml(tmp_path):
    path = write(tmp_path, "model:\n  seq_len: 512\n  patch_size: 64\n  global_dim: 512\n"
                           "  mid_stages:\n    - {patch_size: 8, dim: 256, layers: 2, heads: 4}\n")
    cfg = load_config(path)
    assert [s.patch_size for s in cfg.model.stages] == [64, 8, 1]


@pytest.mark.parametrize("text, overrides, needle", [
    ("model:\n  seq_lenn: 64\n", [], "unknown key 'model.seq_lenn'"),
    ("trian:\n  lr: 1\n", [], "unknown key 'trian'"),
    ("model:\n  global_layers: two\n", [], "model.global_layers: expected an integer"),
    ("train:\n  lr: fast\n", [], "train.lr: expected a number"),
    ("train:\n  precision: fp8\n", [], "train.precision: expected 'bf16' or 'fp32'"),
    ("model:\n  seq_len: 100\n  patch_size: 8\n", [], "model.seq_len: 100 is not divisible by patch_size 8"),
    ("model:\n  global_dim: 100\n  patch_size: 8\n  seq_len: 64\n", [], "model.global_dim: 100 is not divisible by patch_size 8"),
    ("model:\n  global_heads: 3\n", [], "model.global_heads"),
    ("train:\n  global_batch_size: 8\n  grad_accum_steps: 2\n", [], "train.global_batch_size: is set (8) and so is grad_accum_steps (2)"),
    ("", ["train.global_batch_size=-1"], "train.global_batch_size: must be 0 (not fixed) or positive"),
    ("", ["train.micro_batch_size=0"], "train.micro_batch_size: must be positive, got 0"),
    ("", ["train.activation_checkpointing=true", "train.checkpoint_blocks=-1"],
     "train.checkpoint_blocks: must be null (every block), a count of at least 0, a list of such counts "
     "(one per pipeline stage) or auto, got -1"),
    ("", ["train.activation_checkpointing=true", "train.checkpoint_blocks=[2, -1]"],
     "train.checkpoint_blocks: must be null (every block), a count of at least 0, a list"),
    ("", ["train.checkpoint_blocks=auto"], "train.checkpoint_blocks: is auto, but activation_checkpointing is off"),
    ("", ["train.activation_checkpointing=true", "train.checkpoint_blocks=auto", "train.checkpoint_memory_gib=-1"],
     "train.checkpoint_memory_gib: must be 0 (90% of the device's) or positive, got -1.0"),
    ("", ["train.activation_checkpointing=true", "train.checkpoint_blocks=[]"], "got []"),
    ("", ["train.checkpoint_blocks=2"], "train.checkpoint_blocks: is 2, but activation_checkpointing is off"),
    ("", ["train.checkpoint_blocks=[2, 0]"], "train.checkpoint_blocks: is [2, 0], but activation_checkpointing is off"),
    ("", ["train.activation_checkpointing=true", "train.checkpoint_blocks=half"],
     "train.checkpoint_blocks: expected an integer, a list of integers, 'auto' or null, got 'half'"),
    ("", ["train.activation_checkpointing=true", "train.checkpoint_blocks=[2, all]"],
     "train.checkpoint_blocks: expected an integer, a list of integers, 'auto' or null, got [2, 'all']"),
    ("", ["model.nope=1"], "unknown key 'model.nope'"),
    ("", ["train.lr"], "expected key.sub=value"),
    ("- a\n- b\n", [], "expected a mapping"),
    ("model: [\n", [], "invalid YAML"),
    ("data:\n  path: /d\n  sources: [{name: a, path: /a}]\n", [], "data.sources: is set and so is data.path ('/d')"),
    ("data:\n  sources: [{name: a, path: /a, weight: heavy}]\n", [], "data.sources[0].weight: expected a number"),
    ("data:\n  sources: [{name: a, path: /a, share: 1}]\n", [], "unknown key 'data.sources[0].share'"),
])
def test_bad_config_names_key_and_file(tmp_path, text, overrides, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    assert needle in str(err.value)
    assert str(path) in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml"):
        load_config(tmp_path / "nothere.yaml")


def test_data_sources_from_yaml(tmp_path):
    cfg = load_config(write(tmp_path, "data:\n  sources:\n    - {name: web, path: /w, weight: 0.7}\n"
                                      "    - {name: code, path: /c}\n"))
    assert [(s.name, s.path, s.weight) for s in cfg.data.source_list()] == [("web", "/w", 0.7), ("code", "/c", 1.0)]
    assert [(s.name, s.path) for s in load_config(write(tmp_path, "data:\n  path: /x/books\n")).data.source_list()] == [
        ("books", "/x/books")]
