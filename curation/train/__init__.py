"""Train: CLIP training strategies at matched samples seen, checkpoints."""
