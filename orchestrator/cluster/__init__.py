"""The Ray cluster and the machines under a sweep: attach, resources, storage, signals, what Ray says of a failed trial. May import `trainer` only."""
