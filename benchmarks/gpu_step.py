"""The study's training step on CUDA: ms/step and images/s, eager and with ptxlab's speed options.

The step is the one ptxlab's training loop takes (normalise on the device, forward under
autocast, BCE + Dice via `SegmentationLoss`, GradScaler backward, Adam step, the loss read back
every step), with experiments/paper.yaml's model and training settings: smp Unet +
efficientnet-b4 (random init), batch 32, 512², AMP fp16 + GradScaler. The loop's own
bookkeeping is left out (benchmarks/train_overhead.py measures it). Batches are random uint8
tensors already on the device, so no data loading is timed.

Variants are AMP fp16 (`eager`), `train.amp_dtype=bf16` (no GradScaler), and the config switches
`model.channels_last` and `model.compile`, each alone and both together. Every variant gets a fresh model and optimizer, runs `--warmup` untimed steps
(compilation, cuDNN, the GradScaler finding its scale), then `--steps` timed ones between
`torch.cuda.synchronize()` calls. The study reports 450 ms/step on an RTX 3090.

Without CUDA (or with `--cpu-smoke`) it runs a small CPU setting instead so CI can exercise the
script: the default Unet + tu-tf_efficientnet_lite0, batch 2, 128², fp32, eager, 3 steps.

    python benchmarks/gpu_step.py [--steps 20] [--warmup 5] [--variants eager bf16 ...]
    python benchmarks/gpu_step.py --cpu-smoke [--json FILE]

Prints the images/s of the fastest variant last.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ptxlab.config import Config, load_config
from ptxlab.losses import SegmentationLoss
from ptxlab.model import build_model, split_output
from ptxlab.train import effective_lr

PAPER_CONFIG = Path(__file__).parents[1] / "experiments/paper.yaml"
STUDY_MS_PER_STEP = 450.0  # the study's figure, RTX 3090, batch 32 at 512²
STUDY_BATCH = 32
VARIANTS = {  # name -> config overrides (paper.yaml itself trains channels_last)
    "eager": ["model.channels_last=false", "model.compile=false"],
    "bf16": ["train.amp_dtype=bf16", "model.channels_last=false", "model.compile=false"],
    "channels_last": ["model.channels_last=true", "model.compile=false"],
    "compile": ["model.channels_last=false", "model.compile=true"],
    "channels_last+compile": ["model.channels_last=true", "model.compile=true"],
}
STUDY = ["model.encoder_weights=null", "train.device=cuda"]
CPU_SMOKE = ["model.encoder_weights=null", "train.batch_size=2", "data.image_size=128",
             "train.amp=false"]


def load_setting(smoke: bool, overrides: list[str]) -> Config:
    """The smoke or the study's configuration with a variant's overrides applied."""
    if smoke:
        return load_config(None, CPU_SMOKE + overrides)
    return load_config(PAPER_CONFIG, STUDY + overrides)


def time_variant(config: Config, device: torch.device, warmup: int, steps: int) -> dict:
    """Build a fresh model for `config`, run `warmup` then `steps` training steps; time those."""
    torch.manual_seed(0)
    model, _ = build_model(config.model, load_weights=False)
    model.to(device)
    forward = torch.compile(model) if config.model.compile else model
    criterion = SegmentationLoss(config.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=effective_lr(config),
                                 weight_decay=config.optim.weight_decay)
    use_amp = config.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if config.train.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else nullcontext

    batch, size = config.train.batch_size, config.data.image_size
    images = torch.randint(0, 256, (batch, 1, size, size), dtype=torch.uint8, device=device)
    masks = (images > 200).to(torch.uint8)
    def run(count: int) -> None:
        for _ in range(count):
            inputs = model.normalize_input(images)
            if config.model.channels_last:  # as the training loop does with every batch
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with autocast():
                output = split_output(forward(inputs))
                loss, _ = criterion(output, masks)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            loss.item()  # the loop checks and logs the loss every step, which synchronises

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run(warmup)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    synchronize(device)
    started = time.perf_counter()
    run(steps)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {
        "ms_per_step": seconds / steps * 1e3,
        "images_per_s": steps * batch / seconds,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
        else None,
        "scale_dropped": scale_before is not None and scaler.get_scale() < scale_before,
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Forget the last variant's compiled graphs and cached memory, so the next starts clean."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_json(path: Path, setting: str, device: torch.device, warmup: int, steps: int,
               results: dict) -> None:
    record = {"setting": setting, "device": str(device), "torch": torch.__version__,
              "warmup_steps": warmup, "timed_steps": steps, "variants": results}
    path.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="the small CPU setting (chosen anyway when CUDA is unavailable)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (20; smoke: 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (5; smoke: 1)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None,
                        help="default: all five on CUDA, eager in the smoke setting")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the setting and each variant's figures to this file")
    args = parser.parse_args()

    smoke = args.cpu_smoke or not torch.cuda.is_available()
    device = torch.device("cpu" if smoke else "cuda")
    steps = args.steps or (3 if smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    variants = args.variants or (["eager"] if smoke else list(VARIANTS))
    base = load_setting(smoke, [])

    model, train = base.model, base.train
    setting = "cpu smoke setting" if smoke else "the study's setting (experiments/paper.yaml)"
    precision = f"AMP {train.amp_dtype} + GradScaler" if train.amp and not smoke else "fp32"
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu, {torch.get_num_threads()} threads")
    print(f"{setting}: {model.arch} + {model.encoder} (random init), batch {train.batch_size}, "
          f"{base.data.image_size}px, {precision}, Adam, BCE + Dice")
    print(f"device: {where}; torch {torch.__version__}; {warmup} warm-up + {steps} timed steps")

    results = {}
    for name in variants:
        config = load_setting(smoke, VARIANTS[name])
        results[name] = time_variant(config, device, warmup, steps)
        release(device)
        result = results[name]
        if args.json:  # after each variant, so a later one that hangs loses nothing
            write_json(args.json, setting, device, warmup, steps, results)
        line = (f"{name:<22}: {result['ms_per_step']:8.1f} ms/step, "
                f"{result['images_per_s']:7.1f} img/s")
        if result["peak_gib"] is not None:
            line += f", peak {result['peak_gib']:.1f} GiB allocated"
        if "eager" in results:
            line += f", {results['eager']['ms_per_step'] / result['ms_per_step']:.2f}x eager"
        if result["scale_dropped"]:
            line += " (GradScaler skipped some timed steps: raise --warmup)"
        print(line, flush=True)

    fastest = min(results, key=lambda name: results[name]["ms_per_step"])
    if smoke:
        context = "cpu smoke setting, not comparable to the study"
    else:
        study_rate = STUDY_BATCH / STUDY_MS_PER_STEP * 1e3
        print(f"study (RTX 3090)      : {STUDY_MS_PER_STEP:8.1f} ms/step, {study_rate:7.1f} img/s")
        context = f"the study's RTX 3090: {study_rate:.1f}"
    print(f"images/s, fastest variant ({fastest}; {context}): "
          f"{results[fastest]['images_per_s']:.1f}")


if __name__ == "__main__":
    main()
