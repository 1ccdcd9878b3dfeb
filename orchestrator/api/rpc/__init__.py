"""gRPC: JobService, PoolService and AdminService over the service layer."""
