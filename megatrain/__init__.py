"""megatrain: pretraining MEGABYTE with DeepSpeed 3D parallelism."""

__version__ = "0.1.0"
