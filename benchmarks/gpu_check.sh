#!/usr/bin/env bash
# GPU smoke check: a 2-stage CRMA run (LoRA r=16 all-linear + CRMA, one LoRA per task) on a Llama-style
# model built from a config (no download), bf16 base weights, through ContinualRunner on one GPU - first
# with AdapterFSDPStrategy (FSDP1: Lightning's FSDPStrategy with adapter-only checkpoints), then with
# AdapterModelParallelStrategy (FSDP2), each in its own process. Prints training tokens/s per stage and peak GPU memory
# (torch.cuda.max_memory_allocated) for each. Runs in well under 5 minutes on one H100/H200-class GPU.
#
#   bash benchmarks/gpu_check.sh                          # 1.1B (TinyLlama shape), batch 16 x 1024
#   GPU_CHECK_STRATEGIES=fsdp2 bash benchmarks/gpu_check.sh             # FSDP2 only
#   GPU_CHECK_MODEL=3b GPU_CHECK_BATCH=8 bash benchmarks/gpu_check.sh   # Llama-3.2-3B shape
#
# Settings (environment): GPU_CHECK_MODEL 1b|3b, GPU_CHECK_STRATEGIES (space-separated, from fsdp fsdp2
# auto; default "fsdp fsdp2"), GPU_CHECK_BATCH (rows per step), GPU_CHECK_SEQ (tokens per row),
# GPU_CHECK_STEPS (optimizer steps per stage), GPU_CHECK_AC=1 (activation checkpointing per block),
# GPU_CHECK_DIR (run directory prefix). Exit status: 1 if any strategy or measurement failed.
# Out of memory on a smaller GPU: lower GPU_CHECK_BATCH or set GPU_CHECK_AC=1.
#
# Then the issue-25 measurements (GPU_CHECK_MEASURE=0 skips them; ~5 more minutes):
#   * ops CRMA adds per step at 4 and 16 layers, batched factors vs per block (benchmarks/crma_ops.py), on the
#     GPU and under FSDP2 (--fsdp2: 2 gloo CPU processes);
#   * CRMA/LoRA step time in the continual benchmark's model (hidden 128, 4 layers, LoRA on all linears);
#   * CRMA/LoRA step time, batched vs per block, and LoRA+CRMA with its decoder layers torch.compile'd vs
#     eager, bf16 base, hidden 1024 and 2048 (benchmarks/overhead.py --per-block --compile);
#   * peak host RSS per rank at start-up, every rank loading vs init_on_rank0, FSDP2, on a 1.2 GiB base
#     saved to $GPU_CHECK_BASE (benchmarks/startup_memory.py; 2 GPUs if there are, else 2 gloo CPU processes).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check.sh: no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False);" \
        "this check needs one. On CPU run: python -m pytest tests/parallel/test_distributed.py" >&2
    exit 1
fi

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
read -r -d '' CHECK <<'PY' || true
import sys
import json
import os
import shutil
import time
from functools import partial
from pathlib import Path

import lightning as L
import torch

from crma_lightning.adapters import CRMAConfig, LoRAConfig
from crma_lightning.run.runner import ContinualRunner
from crma_lightning.data import SequentialDomainDataModule
from crma_lightning.parallel import AdapterFSDPStrategy, AdapterModelParallelStrategy
from crma_lightning.model.continual_lm import ContinualLM

SIZES = {  # real architectures' shapes, randomly initialised
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4, "vocab_size": 32000},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True},
}
size = os.environ.get("GPU_CHECK_MODEL", "1b")
strategy_name = sys.argv[1]
batch = int(os.environ.get("GPU_CHECK_BATCH", "16"))
seq = int(os.environ.get("GPU_CHECK_SEQ", "1024"))
steps = int(os.environ.get("GPU_CHECK_STEPS", "30"))
ac = os.environ.get("GPU_CHECK_AC", "0") == "1"
run_dir = Path(os.environ.get("GPU_CHECK_DIR", "runs/gpu_check") + f"-{strategy_name}")
shutil.rmtree(run_dir, ignore_errors=True)
strategies = {"fsdp": AdapterFSDPStrategy, "fsdp2": lambda: AdapterModelParallelStrategy(data_parallel_size=1),
              "auto": lambda: "auto"}
strategy = strategies[strategy_name]()


class Throughput(L.Callback):
    """Tokens/s over each stage's steps after a warm-up, and the stage's peak allocated GPU memory."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup, self.stages = warmup, []

    def on_train_start(self, trainer, pl_module) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.times, self.tokens = [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()  # time finished work, not queued kernels
        self.times.append(time.perf_counter())
        self.tokens = int(batch["input_ids"].numel()) * trainer.world_size

    def on_train_end(self, trainer, pl_module) -> None:
        t = self.times[self.warmup:]
        rate = self.tokens * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else float("nan")
        self.stages.append({"domain": pl_module.current_task, "steps": len(self.times), "tokens_per_s": rate,
                            "peak_gib": torch.cuda.max_memory_allocated() / 2**30})


config = {"model_type": "llama", "max_position_embeddings": 4096, **SIZES[size]}
t0 = time.perf_counter()
with torch.device("cuda"):  # initialise the random weights on the GPU: seconds instead of a minute on CPU
    model = ContinualLM(
        model_config=config, tokenizer="byte", dtype="bfloat16", adapter="crma", task_adapters="per_task",
        lora=LoRAConfig(r=16, alpha=32, target_modules="all-linear"), crma=CRMAConfig(),
        optimizer=partial(torch.optim.AdamW, lr=1e-4), fsdp_activation_checkpointing=ac,
        gradient_checkpointing=ac and strategy_name == "auto",
    )
build_s = time.perf_counter() - t0
data = SequentialDomainDataModule(domains=["prose", "code"], max_length=seq, batch_size=batch,
                                  max_chars_per_domain=400_000, max_eval_rows=4 * batch)
throughput = Throughput()
runner = ContinualRunner(
    run_dir=run_dir,
    trainer_kwargs={"accelerator": "gpu", "devices": 1, "strategy": strategy, "precision": "32-true",
                    "max_steps": steps, "log_every_n_steps": 10, "enable_progress_bar": False,
                    "enable_model_summary": False},
    callbacks=[throughput], resume="never", save_stage_adapters=True,
)
report = runner.run(model, data)
params = report["config"]["model"]
print("\n==== gpu_check ====")
print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  strategy: {strategy_name}  "
      f"model: {size} ({params['total_parameters'] / 1e9:.2f}B params, "
      f"{params['trainable_parameters'] / 1e6:.1f}M trainable), batch {batch} x {seq} tokens, "
      f"activation checkpointing: {ac}, model build {build_s:.1f}s")
for s in throughput.stages:
    print(f"stage {s['domain']:>6}: {s['steps']} steps, {s['tokens_per_s']:,.0f} tokens/s, "
          f"peak allocated {s['peak_gib']:.2f} GiB")
print(f"peak allocated over the run: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
      f"(device total {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB)")
print("loss matrix:", json.dumps(report["loss_matrix"]["values"]))
print(f"status: {report['status']}, wall-clock {report['timings']['total_s']:.1f}s; run dir: {run_dir}")
PY

failed=()
for strategy in ${GPU_CHECK_STRATEGIES:-fsdp fsdp2}; do
    echo "==== gpu_check: strategy $strategy ===="
    python -c "$CHECK" "$strategy" || failed+=("$strategy")
done
if [[ "${GPU_CHECK_MEASURE:-1}" == 1 ]]; then
    echo "==== gpu_check: ops CRMA adds per step ===="
    python benchmarks/crma_ops.py --device cuda --layers 4,16 --per-block || failed+=("crma_ops")
    echo "==== gpu_check: ops CRMA adds per step under FSDP2 (2 gloo CPU processes; ops dispatched per rank) ===="
    python benchmarks/crma_ops.py --fsdp2 --layers 4,16 --per-block || failed+=("crma_ops_fsdp2")
    echo "==== gpu_check: CRMA/LoRA step time, the continual benchmark's model (hidden 128) ===="
    python benchmarks/overhead.py --device cuda --hidden 128 --intermediate 256 --layers 4 --heads 4 --vocab 256 \
        --seq 128 --batch 8 --targets all-linear --rank 8 --no-peft --per-block --breakdown --steps 30 --warmup 5 \
        || failed+=("overhead_continual")
    echo "==== gpu_check: CRMA/LoRA step time ===="
    python benchmarks/overhead.py --device cuda --dtype bfloat16 --widths 1024,2048 --seq 1024 --batch 8 \
        --no-peft --per-block --compile --steps 20 --warmup 5 || failed+=("overhead")
    echo "==== gpu_check: start-up host memory per rank ===="
    base="${GPU_CHECK_BASE:-runs/gpu_check-base}"
    mem="${GPU_CHECK_DIR:-runs/gpu_check}-startup"
    accel=cpu
    if python -c 'import sys, torch; sys.exit(0 if torch.cuda.device_count() >= 2 else 1)'; then accel=gpu; fi
    rm -rf "$mem"
    [[ -f "$base/model.safetensors" ]] || python benchmarks/startup_memory.py prepare "$base" || failed+=("prepare")
    python benchmarks/startup_memory.py measure "$base" --accelerator "$accel" --json-dir "$mem/fsdp2-every" \
        || failed+=("startup-every")
    python benchmarks/startup_memory.py measure "$base" --accelerator "$accel" --init-on-rank0 \
        --json-dir "$mem/fsdp2-rank0" || failed+=("startup-rank0")
    python benchmarks/startup_memory.py table "$mem"
fi
if ((${#failed[@]})); then
    echo "gpu_check.sh: FAILED for: ${failed[*]}" >&2
    exit 1
fi
