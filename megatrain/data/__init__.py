"""Data: the shard format (`format`), split streams, the global sample order and loaders.

Exports load on first use: `ByteStream` imports torch, which
`data_prep` (it imports only `megatrain.data.format`) never needs.
"""

from typing import Any

_EXPORTS = {
    "ByteStream": "megatrain.data.loader",
    "MixedStream": "megatrain.data.mixed",
    "read_split": "megatrain.data.stream",
    "SplitStream": "megatrain.data.stream",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
