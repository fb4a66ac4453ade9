"""Checkpoints: their directories (`files`), their parameters whole in any layout
(`state`), and the `python -m megatrain.checkpoint` tools (`__main__`)."""

from .files import (PARTIAL, CheckpointError, DamagedCheckpointError, commit, damaged_files, is_universal, load_file,
                    partial_tag, read_client_state, resolve_tag, step_tag, step_tags)
from .state import STATE_KEYS, SavedParams, consolidate, convert, load_model, read_params

__all__ = ["PARTIAL", "STATE_KEYS", "CheckpointError", "DamagedCheckpointError", "SavedParams", "commit", "consolidate",
           "convert", "damaged_files", "is_universal", "load_file", "load_model", "partial_tag", "read_client_state",
           "read_params", "resolve_tag", "step_tag", "step_tags"]
