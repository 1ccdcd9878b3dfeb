"""HTTP: /metrics, /healthz, the JSON mirror of AdminService and the embedded web UI."""
