"""aviato's benchmarks: ``python benchmarks/cluster.py`` (or ``python -m benchmarks.cluster``)."""
