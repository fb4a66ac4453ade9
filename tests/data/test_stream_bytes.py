import numpy as np
from megatrain.data import ByteStream, read_split


def test_streamed_samples_are_the_documents_bytes(tiny_shards):
    """Every byte of every streamed sample is the split's bytes at some offset (the shuffle
    moves whole windows; nothing is made up, padded or shifted inside one)."""
    corpus = read_split(tiny_shards, "train").tobytes()
    with ByteStream(tiny_shards, "train", 256, global_batch_size=8, micro_batch_size=8, seed=0) as stream:
        for _ in range(3):
            for sample in next(stream).numpy():
                assert corpus.find(sample.tobytes()) >= 0
