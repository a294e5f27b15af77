"""Shared by the gateway and compute processes: context, logs, heartbeat.

`offload.v1` holds the code generated from `protos/` by `make protos` (never hand-edited).
Nothing here imports grpc: pool workers import this package too.
"""
