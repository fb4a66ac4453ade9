"""Sharding jobs: inputs -> zstd Arrow shards + manifest (see megatrain.data.format)."""
