"""Storage: the data home's paths and the Delta lake (tables, list<float32> vectors)."""
