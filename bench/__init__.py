"""Benchmarks and the model fetcher, run as modules from the repository root: `python -m bench.decode ...`."""
