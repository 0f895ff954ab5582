"""Side-by-side throughput and memory runs of patch jobs against hand-written baselines.

Not tests: run them by hand (``make bench`` or ``python -m benchmarks.price_adjustment``).
"""
