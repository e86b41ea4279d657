"""Data-parallel training: one job's micro-steps shared by the workers of a torch.distributed process group.

    ranks     which worker this process is, and the few collectives the job loop needs (sums, a barrier)
    shares    each worker's contiguous share of a micro-batch
    replica   the model as a worker trains it: itself on one worker, DistributedDataParallel on several

Whoever starts the workers (Ray Train for `mdsweep`, or any launcher) initialises the process group; the job reads
it from torch.distributed and never starts one. Without a process group, or with one worker, nothing here adds
a wrapper, a collective or a copy: the job runs as it does alone. May import `trainer.model`, `trainer.data` and
the trainer's base.
"""
