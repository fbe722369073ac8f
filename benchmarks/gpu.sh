#!/usr/bin/env bash
# Every GPU figure in docs/benchmarks.md, in one go:   bash benchmarks/gpu.sh SHARDS_DIR 2>&1 | tee gpu.log
# SHARDS_DIR: shards from data_prep (e.g. `python benchmarks/loader.py --dir D` leaves some in D/shards_w2).
set -u
SHARDS=${1:-}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'lightning', lightning.__version__)"
echo "== routed vs dense-mask attention (ViT-B token counts, bf16, batch 8): sdpa_slices, flex (compiled), dense_mask"
python benchmarks/attention.py --batch 8 --reps 20
echo "== Zorro-ViT-B training step, bf16, eager; largest batch"
python benchmarks/train_step.py --batch 64 --steps 20 --find-max-batch
echo "== the same with torch.compile (what trainer=gpu does): flex attention (auto), then per-group SDPA slices"
python benchmarks/train_step.py --batch 64 --steps 20 --compile
python benchmarks/train_step.py --batch 64 --steps 20 --compile --attention-backend sdpa_slices
echo "== where the compiled step's time goes (top kernels, non-matmul share; for docs/benchmarks.md)"
python benchmarks/train_step.py --batch 64 --steps 5 --compile --profile
if [ -n "$SHARDS" ]; then
  echo "== data wait with the shard DataModule feeding the GPU"
  python benchmarks/train_step.py --batch 64 --steps 30 --shards "$SHARDS" --workers 12
  echo "== the same with the frames decoded on the GPU (data.decode_on_device: nvJPEG + augmentation in a batch), 8 workers"
  python benchmarks/train_step.py --batch 64 --steps 30 --shards "$SHARDS" --workers 8 --decode-on-device
fi
echo "== trainer=gpu end to end (bf16-mixed, fused AdamW), tiny model"
python train.py trainer=gpu debug=tiny logger=csv trainer.max_epochs=1 paths.log_dir=/tmp/zorro-gpu-run
