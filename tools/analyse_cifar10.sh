#!/usr/bin/env bash
# The whole analysis chain on CIFAR-10, as a user runs it with a public pretrained encoder, here with the
# quick MAE run's export standing in for the hub weights (docs/analysis.md, "The whole chain"):
#   1. features of 3 blocks in one pass, float16, through the `pretrained:` source with a local weights file
#   2. a TopK SAE per block
#   3. splice-in evaluation of each SAE (accuracy recovered, KL) -> a markdown table
#   4. the sparse latent cache of one SAE on the val images, the gallery read from it, and the latent explorer site
#
#   bash tools/analyse_cifar10.sh runs/mae_vit_tiny_cifar10_quick/lightning_logs/version_0/encoder.safetensors
#
# Env: OUT (default runs/analyse_cifar10), PER_CLASS train images per class (default 1000), VAL_PER_CLASS
# (default 200), SAE_EPOCHS (default 3), LAYERS (default "3 7 11"). Each step is a plain `mim` command; a
# re-run reuses the feature stores and the cache (same settings), so only changed steps run again.
set -euo pipefail
E=${1:?usage: tools/analyse_cifar10.sh <encoder.safetensors of a ViT-Tiny/4 mim run>}
OUT=${OUT:-runs/analyse_cifar10}
PER_CLASS=${PER_CLASS:-1000}
VAL_PER_CLASS=${VAL_PER_CLASS:-200}
SAE_EPOCHS=${SAE_EPOCHS:-3}
LAYERS=${LAYERS:-3 7 11}
LAYER_LIST="[$(echo "$LAYERS" | tr ' ' ',')]"
# The MAE run's own preprocessing (CIFAR-10 statistics, no crop): set explicitly, since a `pretrained:` source
# would otherwise bring the timm tag's (mean = std = 0.5, crop 0.9).
PRE=(--data.init_args.mean "[0.4914,0.4822,0.4465]" --data.init_args.std "[0.2470,0.2435,0.2616]"
     --data.init_args.eval_crop_pct 1.0 --data.init_args.interpolation bicubic)
SRC=(--model.init_args.encoder pretrained:vit_tiny_patch16_224.augreg_in21k --model.init_args.pretrained_file "$E"
     --model.init_args.model_kwargs "{img_size: 32, patch_size: 4}")
t0=$SECONDS
stamp() { echo "[analyse_cifar10] $1: $((SECONDS - t0)) s"; }

# 1. Features: patch tokens of 3 blocks in one pass, float16 (train: PER_CLASS per class; val: VAL_PER_CLASS).
for split in train val; do
  mim predict -c configs/extract/vit_tiny_cifar10.yaml "${SRC[@]}" "${PRE[@]}" \
    --model.init_args.layers "$LAYER_LIST" --model.init_args.tokens "[patch]" --model.init_args.dtype float16 \
    --data.init_args.predict_split "$split" --data.init_args.limit_per_class "$PER_CLASS" \
    --data.init_args.val_limit_per_class "$VAL_PER_CLASS" \
    --trainer.callbacks.init_args.path "$OUT/features/$split"
done
stamp features

# 2. A TopK SAE per block (d_sae 3072, k 32), CSV logs for the table.
for L in $LAYERS; do
  mim fit -c configs/sae/topk_vit_tiny_cifar10.yaml \
    --data.init_args.train_store "$OUT/features/train/layer_$L" --data.init_args.val_store "$OUT/features/val/layer_$L" \
    --trainer.max_epochs "$SAE_EPOCHS" --model.init_args.warmup_steps 100 --model.init_args.downstream false \
    --trainer.default_root_dir "$OUT/sae/layer_$L" \
    --trainer.logger lightning.pytorch.loggers.CSVLogger --trainer.logger.save_dir "$OUT/sae/layer_$L"
done
stamp saes

# 3. Splice-in evaluation of each SAE on the val images (head fitted on clean final features, mean-pooled).
for L in $LAYERS; do
  mim validate -c configs/sae/splice_vit_tiny_cifar10.yaml \
    --model.init_args.sae "$OUT/sae/layer_$L/lightning_logs/version_0/sae.safetensors" \
    --model.init_args.store "$OUT/features/train/layer_$L" --model.init_args.pool avg \
    --model.init_args.head_images_per_class "$PER_CLASS" \
    "${PRE[@]}" --data.init_args.val_limit_per_class "$VAL_PER_CLASS" \
    --trainer.default_root_dir "$OUT/splice/layer_$L" --trainer.logger.init_args.save_dir "$OUT/splice/layer_$L"
done
stamp splice

# 4. Latent cache of the middle block's SAE on the val images, and the gallery from it.
MID=$(echo "$LAYERS" | awk '{print $2}')
mim predict -c configs/sae/latent_cache_vit_tiny_cifar10.yaml \
  --model.init_args.sae "$OUT/sae/layer_$MID/lightning_logs/version_0/sae.safetensors" \
  --data.init_args.store "$OUT/features/val/layer_$MID" --trainer.callbacks.init_args.path "$OUT/cache/layer_$MID"
python tools/sae_gallery.py --cache "$OUT/cache/layer_$MID" --store "$OUT/features/val/layer_$MID" \
  --select selective --n-latents 8 --out "$OUT/gallery/layer_$MID"
mim-explore --sae "$OUT/sae/layer_$MID/lightning_logs/version_0/sae.safetensors" --store "$OUT/features/val/layer_$MID" \
  --cache "$OUT/cache/layer_$MID" --out "$OUT/explore/layer_$MID"
stamp "cache + gallery + explorer"

python tools/analysis_table.py "$OUT" $LAYERS
