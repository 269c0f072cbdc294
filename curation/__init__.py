"""curation: the plain-Python library of the CLIP data-curation platform.

Data model, shard IO, encoders, clustering, de-duplication, pruning budgets, recipes,
training and evaluation. No Dagster here: the ``assets`` package adapts these functions
into software-defined assets.
"""

__version__ = "0.1.0"
