"""Ingest: shard keys, the shard reader and writer, dataset sources, sample ids."""
