"""Benchmarks: each prints figures as ratios to a physical limit measured in the same run.

Run ``python -m bench`` (quick) or ``python -m bench --full``. Nothing here asserts on time.
"""
