"""The Ray cluster and the machines under a sweep: attach, resources, storage, signals. May import `trainer` only."""
