"""Performance benchmarks against the real local inference server: ``bash benchmarks/run.sh``."""
