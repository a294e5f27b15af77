"""The compute process: owns the embedding table in shared memory and a process pool.

Import nothing heavy here: pool workers import `compute.worker`, which must never pull in grpc.
"""
