"""The edges: gRPC servicers, the HTTP admin API and web UI, and the server that runs them."""
