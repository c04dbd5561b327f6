"""Benchmarks: one module per capability (``bench_<name>.py`` with ``run(size) -> DataFrame``).

Each prints ratios measured in the same run against a peer or a bound; timings are never
asserted anywhere (the machine is shared and noisy: only same-run ratios mean something).
"""
