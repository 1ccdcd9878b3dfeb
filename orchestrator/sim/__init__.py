"""The scheduler simulator: workloads, a simulated cluster, the real engine, reports."""
