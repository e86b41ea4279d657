"""One Moondream2 fine-tuning job, in five layers under the job itself; each imports only the layers under it.

    job*.py, predict, export, ...   the job: its config, loop, checkpoints, prediction and export
    parallel/     data-parallel training over a torch.distributed process group (DDP), one worker's share
    evaluation/   greedy decoding and the scores (exact match, CER)
    data/         samples from files, synthetic captchas, the crop cache, batches
    memory/       the GPU cap and peak readings, the memory estimate, precision and optimizer choices
    model/        the network, its config, its choices, weights, tokenizer and loading

The base every layer may read: `job_config` (the contract, which checks every value), the torch-free
modules it reads them with (`budget`, `faults`), `files` (atomic writes) and `cpu_math`. Importing the
package pins MKL's code path first (`cpu_math`), so a job's numbers do not depend on the process it runs in. This package
never imports Ray, Optuna or `orchestrator`, so a single job runs (and is tested) without a cluster; the
sweep driver calls `trainer.job.run_job`.
"""
from trainer.cpu_math import pin_mkl_code_path

pin_mkl_code_path()
