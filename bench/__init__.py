"""Benchmarks: offload vs the naive designs, side by side, in one run (`python -m bench`)."""
