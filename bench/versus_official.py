"""Our trainer against the official Moondream fine-tune, same weights, same sample, same settings (issue 32).

    python bench/versus_official.py --official DIR [--preset small|moondream2] [--repeats N] [--steps N]
                                    [--device cpu|cuda] [--work DIR]

DIR is a checkout of github.com/vikhyat/moondream at commit 84663ac ("PIL Fallback", 2025-05-16): the newest
whose `moondream/torch/` the project's model reproduces (its config has `n_kv_heads` and no `group_size`, as the
`tests/fixtures/moondream2-tiny` reference does; later commits add int4 layers and load weights in bf16).
Its `moondream/finetune/finetune_text.py` is the one of af285f9 ("Fine-tune updates"). Make one with
`git --git-dir=MIRROR archive 84663ac | tar -x -C DIR`. The official package is imported from DIR at run time,
as a user runs their checkout; none of its code is in this project. Three stand-ins, all at run time: the
official model's tokenizer download (the same token ids are fed to both models, embedded with the official
`text_encoder` as finetune_text.py does), the `datasets`/`wandb` imports of finetune_text.py (only its
`text_loss` is used), and its crops, made in fp16 by `prepare_crops` and upcast here so that its
fp32 vision tower accepts them.

Weights: one seeded checkpoint in the official 2025 layout, fp16 (the official loader casts to fp16, so fp16
values load exactly in both), made by the project's own model and `save_model`, loaded by the official
`load_weights_into_model` and by our loader; both models then train in fp32. `small` is PRESETS["small"] at the
official geometry (378-px crops, 27 vision layers, text heads 64 wide, context 1024): the official training path
fixes the prefix at 730 positions, pools local features to an `enc_n_layers` grid of 729 tokens and rotates 32
dimensions of each head.

Legs, each in its own process, interleaved over `--repeats`:
- official: finetune_text.py's step (vision under no_grad, `text_loss` over the answer tokens, AdamW8bit lr 3e-6,
  betas (0.9, 0.95), eps 1e-6 on `model.text`; batch 1, no checkpointing, its SDPA with a dense boolean
  prefix mask) with grad_accum 1, so every sample does forward, backward and an optimizer step;
- ours, same settings: the trainer's `prepare_model`, `accumulate_gradients` and `optimizer_step` with
  scope text, batch 1, no checkpointing, prefix attention on SDPA, the same optimizer and hyper-parameters
  (clipping set out of reach, as the official does not clip);
- ours, defaults: the same but with the job's defaults (checkpointing on, clipping at 1.0); the optimizer
  stays the official one, as our default (torch AdamW, fp32 states, 11.3 GB at real size) does not fit beside
  fp32 weights and gradients in this machine's 24 GB.

Each process runs one warm-up step and `--steps` timed steps and reports its mean seconds per sample, its peak
RSS (ru_maxrss) and the loss of the first step. The table shows medians over the repeats; the losses of the
official leg and ours at the same settings must agree to 1e-4 (exit status 1 otherwise).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LEGS = ("official", "ours-same", "ours-defaults")
SETTINGS = {
    "official": "finetune_text.py: text scope, batch 1, no checkpointing, SDPA + dense prefix mask",
    "ours-same": "text scope, batch 1, no checkpointing, prefix on SDPA",
    "ours-defaults": "our defaults: checkpointing on, clip 1.0 (optimizer as official)",
}
# finetune_text.py's AdamW8bit; its weight decay is bitsandbytes' default
LR, BETAS, EPS, WEIGHT_DECAY = 3e-6, (0.9, 0.95), 1e-6, 0.01
LOSS_TOLERANCE = 1e-4
MIB = 2 ** 20


def bench_config(preset: str) -> Any:
    """The model sizes of a preset, with the character tokenizer; `small` at the official geometry."""
    from trainer.model.config import PRESETS

    config = dataclasses.replace(PRESETS[preset], tokenizer="char")
    if preset == "small":
        config = dataclasses.replace(
            config, vision=dataclasses.replace(config.vision, crop_size=378, enc_n_layers=27, max_crops=12,
                                               overlap_margin=4),
            text=dataclasses.replace(config.text, n_heads=config.text.dim // 64, n_kv_heads=config.text.dim // 64,
                                     max_context=1024))
    return config


def fabricate(work: Path, preset: str, seed: int = 0) -> dict[str, Any]:
    """Seeded weights (the project's model, fp16) in the official 2025 layout under work/model, and one sample."""
    import torch

    from trainer.data.synth import generate_samples
    from trainer.job_config import JobConfig
    from trainer.model.loading import LoadedModel, builtin_choice, save_model
    from trainer.model.network import MoondreamModel
    from trainer.model.tokenizer import CharTokenizer, get_template

    config, tokenizer = bench_config(preset), CharTokenizer()
    torch.manual_seed(seed)
    model = MoondreamModel(config, bos_id=tokenizer.bos_id).half()
    save_model(LoadedModel(model, tokenizer, None, builtin_choice(tokenizer)), work / "model")
    label, png = next(generate_samples(1, seed=seed))
    (work / "sample.png").write_bytes(png)
    template = get_template(builtin_choice(tokenizer).template)
    return {"label": label, "prompt_ids": template.prompt_ids(tokenizer, JobConfig.question),
            "answer_ids": template.answer_ids(tokenizer, label), "bos_id": tokenizer.bos_id}


def timed_steps(step: Callable[[], float], steps: int, sync: Callable[[], None]) -> dict[str, Any]:
    """One warm-up step, then `steps` timed ones: the first step's loss, mean wall and CPU seconds (all threads;
    the CPU time is the steadier figure on a shared machine), this process's peak RSS."""
    loss = step()
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync()
    return {"loss": loss, "s_per_sample": (time.perf_counter() - wall) / steps,
            "cpu_s_per_sample": (time.process_time() - cpu) / steps,
            "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB


def official_leg(work: Path, official: Path, preset: str, device: str, steps: int,
                 sample: dict[str, Any]) -> dict[str, Any]:
    import torch
    from PIL import Image

    sys.path.insert(0, str(official))
    # finetune_text.py imports these at its top for its data and logging, which the bench does not use
    sys.modules.setdefault("wandb", types.ModuleType("wandb"))
    sys.modules.setdefault("datasets", types.SimpleNamespace(load_dataset=None))
    import moondream.torch.moondream as md
    from moondream.finetune import finetune_text as ft
    from moondream.torch.config import RegionConfig, TextConfig, TokenizerConfig, VisionConfig
    from moondream.torch.weights import load_weights_into_model
    from bitsandbytes.optim import AdamW8bit

    imported = peak_rss_mib()
    md.Tokenizer = types.SimpleNamespace(from_pretrained=lambda *a, **k: None)  # no download: ids come ready-made
    fp16_crops = md.prepare_crops
    md.prepare_crops = lambda image, config, device: (lambda c, t: (c.float(), t))(*fp16_crops(image, config, device))

    ours = bench_config(preset)
    text = TextConfig(**dataclasses.asdict(ours.text), prefix_attn=1 + ours.vision.n_image_tokens)
    # the region head has no use here; at `small` it is cut to the text width so that it does not outweigh the model
    region = RegionConfig() if ours.text.dim == TextConfig.dim else RegionConfig(dim=ours.text.dim,
                                                                                inner_dim=ours.text.ff_dim)
    config = md.MoondreamConfig(text=text, vision=VisionConfig(**dataclasses.asdict(ours.vision)), region=region,
                                tokenizer=TokenizerConfig(bos_id=sample["bos_id"], eos_id=sample["bos_id"]))
    if device != "cpu":  # as finetune_text.py does: on CPU it sets no default device (a per-op Python hook)
        torch.set_default_device(device)
    model = md.MoondreamModel(config, dtype=torch.float32)
    load_weights_into_model(str(work / "model" / "model.safetensors"), model)
    optimizer = AdamW8bit([{"params": model.text.parameters()}], lr=LR, betas=BETAS, eps=EPS)
    image = Image.open(work / "sample.png")
    answer = sample["answer_ids"]

    def step() -> float:  # finetune_text.py's loop body, with an optimizer step every sample
        with torch.no_grad():
            img_emb = model._run_vision_encoder(image)
        bos_emb = ft.text_encoder(torch.tensor([[sample["bos_id"]]], device=model.device), model.text)
        question_emb = ft.text_encoder(torch.tensor([[sample["prompt_ids"]]], device=model.device),
                                       model.text).squeeze(0)
        answer_emb = ft.text_encoder(torch.tensor([[answer]], device=model.device), model.text).squeeze(0)
        inputs_embeds = torch.cat([bos_emb, img_emb[None], question_emb, answer_emb], dim=1)
        loss = ft.text_loss(inputs_embeds=inputs_embeds, w=model.text,
                            labels=torch.tensor([[answer]], device=model.device), config=config.text)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.detach())

    return {**timed_steps(step, steps, lambda: synchronize(device)), "imports_rss_mib": imported}


def ours_leg(work: Path, device: str, steps: int, sample: dict[str, Any], defaults: bool) -> dict[str, Any]:
    import bitsandbytes  # noqa: F401  (imported by build_optimizer; here, so that both legs count it with imports)
    import torch
    from PIL import Image

    from trainer.data.batching import EncodedSample, collate
    from trainer.devices import resolve_device, resolve_precision
    from trainer.job import accumulate_gradients, optimizer_step, prepare_model
    from trainer.parallel.ranks import current_ranks
    from trainer.parallel.replica import Replica
    from trainer.job_config import JobConfig
    from trainer.memory.optimizers import build_optimizer
    from trainer.model.image_crops import make_crops

    imported = peak_rss_mib()
    same = {} if defaults else {"gradient_checkpointing": False, "max_grad_norm": 1e30}
    config = JobConfig(model=str(work / "model"), train_scope="text", batch_size=1, grad_accum=1,
                       attention="prefix", attention_backend="sdpa", optimizer="adamw8bit",
                       lr=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS, weight_decay=WEIGHT_DECAY,
                       precision="fp32", device=device, **same)
    target = resolve_device(config.device)
    loaded = prepare_model(config, resolve_precision(config, target))
    model = loaded.model.to(target).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay,
                                betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    scaler = torch.amp.GradScaler(target.type, enabled=False)
    crops = make_crops(Image.open(work / "sample.png"), model.config.vision)
    encoded = EncodedSample("sample", sample["label"], crops.pixels, crops.tiling, tuple(sample["prompt_ids"]),
                            tuple(sample["answer_ids"]))

    def step() -> float:  # run_job's step: a micro-batch from uint8 crops, backward, clip, optimizer step
        batch = collate([encoded], loaded.tokenizer.eos_id)
        loss, _, _ = accumulate_gradients(Replica(model, current_ranks(), config.parallel, target), [batch],
                                           config.attention, scaler, target, None)
        optimizer_step(optimizer, scaler, params, config.max_grad_norm, finite_loss=True)
        return loss

    return {**timed_steps(step, steps, lambda: synchronize(device)), "imports_rss_mib": imported}


def synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_child(args: argparse.Namespace, role: str) -> dict[str, Any]:
    """One leg (or the fabrication) in a fresh process; its JSON answer is the last line of its output. A leg
    killed by a signal (SIGKILL: the kernel's OOM killer when host memory runs out) answers {"killed": N}."""
    command = [sys.executable, __file__, "--child", role, "--work", str(args.work), "--preset", args.preset,
               "--steps", str(args.steps), "--device", args.device]
    if args.official:
        command += ["--official", str(args.official)]
    started = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode < 0 and role != "fabricate":
        print(f"[{time.strftime('%H:%M:%S')}] {role}: killed by signal {-done.returncode}", file=sys.stderr)
        return {"killed": -done.returncode}
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{role} failed with exit {done.returncode}")
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[{time.strftime('%H:%M:%S')}] {role}: {time.perf_counter() - started:.0f} s in all, {answer}",
          file=sys.stderr, flush=True)
    return answer


def child(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "fabricate":
        return fabricate(args.work, args.preset)
    sample = json.loads((args.work / "sample.json").read_text())
    if args.child == "official":
        return official_leg(args.work, args.official, args.preset, args.device, args.steps, sample)
    return ours_leg(args.work, args.device, args.steps, sample, defaults=args.child == "ours-defaults")


def table(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> tuple[str, Optional[float]]:
    """The Markdown table of medians over the runs that finished, and the ratios; returns it with
    |loss official - loss ours| (None when either leg never finished)."""
    keys = ("s_per_sample", "cpu_s_per_sample", "peak_rss_mib", "imports_rss_mib", "loss")
    lines = [f"preset `{args.preset}`, device {args.device}, {args.repeats} repeats × {args.steps} timed steps "
             "(after 1 warm-up), fp32, bitsandbytes AdamW8bit in every leg; medians", "",
             "| leg | settings | s/sample | CPU s/sample | peak RSS MiB | of which imports | loss (first step) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    median: dict[str, dict[str, float]] = {}
    for leg, runs in results.items():
        finished = [r for r in runs if "killed" not in r]
        killed = f" ({len(runs) - len(finished)} of {len(runs)} killed by SIGKILL)" if len(finished) < len(runs) else ""
        if not finished:
            lines.append(f"| {leg} | {SETTINGS[leg]}{killed} | – | – | – | – | – |")
            continue
        m = median[leg] = {k: statistics.median(r[k] for r in finished) for k in keys}
        lines.append(f"| {leg} | {SETTINGS[leg]}{killed} | {m['s_per_sample']:.3f} | {m['cpu_s_per_sample']:.3f} "
                     f"| {m['peak_rss_mib']:.0f} | {m['imports_rss_mib']:.0f} | {m['loss']:.6f} |")
    if "official" not in median or "ours-same" not in median:
        return "\n".join(lines), None
    official, ours = median["official"], median["ours-same"]
    difference = abs(official["loss"] - ours["loss"])
    ratio = {k: ours[k] / official[k] for k in keys[:3]}
    lines += ["", f"ours/official at equal settings: time {ratio['s_per_sample']:.2f} (CPU time "
              f"{ratio['cpu_s_per_sample']:.2f}), memory {ratio['peak_rss_mib']:.2f}; loss difference "
              f"{difference:.2e} (tolerance {LOSS_TOLERANCE:g})"]
    return "\n".join(lines), difference


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", type=Path, help="checkout of github.com/vikhyat/moondream (commit 84663ac)")
    parser.add_argument("--preset", choices=("small", "moondream2"), default="small")
    parser.add_argument("--repeats", type=int, default=3, help="processes per leg, interleaved (default 3)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process after a warm-up (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--work", type=Path, help="where the weights and the sample go (default: a temporary dir)")
    parser.add_argument("--child", choices=("fabricate", *LEGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0
    if args.official is None or not (args.official / "moondream" / "finetune" / "finetune_text.py").is_file():
        parser.error("--official must be a checkout of github.com/vikhyat/moondream")
    with tempfile.TemporaryDirectory(prefix="versus-official-") as scratch:
        args.work = args.work or Path(scratch)
        args.work.mkdir(parents=True, exist_ok=True)
        (args.work / "sample.json").write_text(json.dumps(run_child(args, "fabricate")))
        results: dict[str, list[dict[str, Any]]] = {leg: [] for leg in LEGS}
        for _ in range(args.repeats):
            for leg in LEGS:
                results[leg].append(run_child(args, leg))
    report, difference = table(results, args)
    print(report)
    if difference is None:
        print("FAIL: no loss to compare: the official leg or ours at equal settings never finished")
        return 1
    if not difference <= LOSS_TOLERANCE:
        print(f"FAIL: the losses differ by {difference:.2e}, more than {LOSS_TOLERANCE:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
