"""Peak memory and step time of one training step, per attention backend and mode.

    python bench/attention_memory.py --config tiny --batch-sizes 1 8
    python bench/attention_memory.py --config moondream2 --batch-sizes 1 8   # on a GPU

Each configuration runs in a fresh process, so peaks do not leak between rows:
on CUDA the allocator's peak (fp16 autocast + loss scaling), on CPU the growth of
the resident set over the step (fp32). Random weights and inputs; the sequence is
BOS + image tokens + `--text-len` text tokens (≈ 760 for the real model).
Step time is the median of `--repeats` steps after one warm-up step.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import resource
import statistics
import time

from isolated import run_row, serve_row, worker_flag

BACKENDS = ("sdpa", "flex", "eager-4d")
MODES = ("causal", "prefix")


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(spec: dict) -> dict:
    """One configuration, in this process: returns peak bytes and median step seconds."""
    import torch

    from trainer.model.config import PRESETS
    from trainer.model.network import MoondreamModel

    device = torch.device(spec["device"])
    torch.manual_seed(0)
    config = PRESETS[spec["config"]]
    if spec["crop_size"]:  # keep the widths, take another image geometry (378 → 729 image tokens)
        config = dataclasses.replace(config, vision=dataclasses.replace(
            config.vision, crop_size=spec["crop_size"], overlap_margin=4 if spec["crop_size"] >= 224 else 1))
    model = MoondreamModel(config, bos_id=0, attention_backend=spec["backend"]).to(device)
    model.set_train_scope(spec["scope"])
    model.set_gradient_checkpointing(spec["checkpointing"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=fp16)
    batch, size = spec["batch_size"], config.vision.crop_size
    crops = torch.randn(2 * batch, 3, size, size, device=device)  # a captcha: global crop + one tile
    tilings = [(1, 1)] * batch
    ids = torch.randint(1, config.text.vocab_size, (batch, spec["text_len"]), device=device)
    labels = ids.clone()
    labels[:, : spec["text_len"] // 2] = -100

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.float16, enabled=fp16):
            loss, _, count = model.answer_loss(crops, tilings, ids, labels, spec["mode"])
        scaler.scale(loss / count).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if fp16:
            torch.cuda.synchronize()

    step()  # warm-up: optimizer state, kernels, compiled flex kernels
    sync()
    if fp16:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = current_rss()
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    if fp16:
        peak = torch.cuda.max_memory_allocated()
        growth = peak - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        growth = peak - base
    return {"peak_bytes": peak, "step_growth_bytes": max(growth, 0), "step_s": statistics.median(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny", help="model preset (tiny, small, moondream2)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    parser.add_argument("--text-len", type=int, default=30, help="text tokens after the image prefix")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration (median reported)")
    parser.add_argument("--crop-size", type=int, default=None,
                        help="override the preset's crop size, e.g. 378 for Moondream2's 729 image tokens "
                             "(sequence ≈ 760) with the preset's widths")
    parser.add_argument("--scope", default="text", help="train scope (text is the official captcha recipe)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--backends", nargs="+", default=None, help=f"subset of {BACKENDS}")
    worker_flag(parser)
    args = parser.parse_args()
    if serve_row(args, measure):
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backends = args.backends or [b for b in BACKENDS if b != "flex" or device == "cuda"]
    print(f"config={args.config} crop_size={args.crop_size or 'preset'} device={device} text_len={args.text_len} "
          f"scope={args.scope} "
          f"precision={'fp16' if device == 'cuda' else 'fp32'} repeats={args.repeats}")
    header = f"{'batch':>5} {'backend':>9} {'mode':>7} {'ckpt':>5} {'peak MiB':>10} {'step MiB':>10} {'step ms':>9}"
    print(header)
    print("-" * len(header))
    for batch, backend, mode, ckpt in itertools.product(args.batch_sizes, backends, MODES, (True, False)):
        spec = dict(config=args.config, crop_size=args.crop_size, batch_size=batch, backend=backend, mode=mode, checkpointing=ckpt,
                    text_len=args.text_len, repeats=args.repeats, scope=args.scope, device=device)
        r = run_row(__file__, spec)
        if isinstance(r, str):
            print(f"{batch:>5} {backend:>9} {mode:>7} {str(ckpt):>5}  {r}")
            continue
        print(f"{batch:>5} {backend:>9} {mode:>7} {str(ckpt):>5} {r['peak_bytes'] / 2**20:>10.1f} "
              f"{r['step_growth_bytes'] / 2**20:>10.1f} {r['step_s'] * 1000:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
