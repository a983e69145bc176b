"""Benchmarks and compilation-config tuning tools behind ``kiln bench``.

One module per subcommand (``throughput``, ``latency``, ``compile``, ``sweep``) plus shared pieces:
named model shapes, workloads, environment capture, the HF transformers baseline and plots.
"""
