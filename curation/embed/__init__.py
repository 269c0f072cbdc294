"""Embed: encoders, the open_clip model registry, per-shard embedding, reading the pool."""
