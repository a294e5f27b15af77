"""Histogram buckets shared by both processes, so their figures line up on one dashboard."""

from __future__ import annotations

# Seconds: a light call takes ~0.1-1 ms, a Search 10-100 ms, a stalled call seconds.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Calls per batched RPC, up to the largest batch either side allows.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
# Request bytes per batched RPC.
BATCH_BYTES_BUCKETS = (256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
# Seconds a batch's oldest call waited for the batch to leave (one loop iteration: ~10 µs-1 ms).
BATCH_WAIT_BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)
