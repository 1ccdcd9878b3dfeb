"""The core's state: the live cluster, the queue, the durable job store, scheduler
versions, the snapshot journal and the decision log."""
