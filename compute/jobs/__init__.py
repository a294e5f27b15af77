"""Jobs: long batch work run by compute, persisted in SQLite, no broker.

`store` (persistence), `types` (how a job type is declared), `batch_search` (the built-in
type), `service` (claims and runs jobs in the pool), `operations` (the five RPCs).
Pool workers import job-type modules: nothing in this package may import grpc.
"""
