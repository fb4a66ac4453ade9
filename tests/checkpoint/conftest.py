from ..distributed import cpu_comm, tiny_shards  # noqa: F401  (the shared session fixtures)
