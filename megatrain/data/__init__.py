"""Data: the shard format (`format`) shared by data_prep and the loaders."""
