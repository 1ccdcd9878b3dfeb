"""Inference capacity: the local pool, its hardware probes, the completion client that
runs a job on a worker, the remote pool manager, and the development worker."""
