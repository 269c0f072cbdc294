"""Evaluate: zero-shot and retrieval evaluation, the comparison report."""
