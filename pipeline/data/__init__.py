"""Datasets as WebDataset shards: sources, the shard format and (later) the streaming loaders."""
