"""The compute spec (device, precision, workers) and the executor that maps work in process or on Ray."""
