"""Linear probe fitted to convergence (L-BFGS, :func:`mim.eval.fit_linear_classifier`) on clean CIFAR features.

The shipped probe config trains with SGD for a fixed number of epochs; how far it gets depends on the features'
conditioning as much as on their content (on the quick MAE run, 20 SGD epochs put MAE 5.2 points above random
init where a converged probe puts them level). This tool computes each encoder's pooled features of the train
and test images once, without augmentation, and fits multinomial logistic regression to convergence.

    python tools/converged_probe.py runs/mae/lightning_logs/version_0/encoder.safetensors \\
        runs/mae_random/lightning_logs/version_0/encoder.safetensors
    python tools/converged_probe.py timm:vit_tiny_patch16_224 --model-kwargs '{"img_size": 32, "patch_size": 4}'
"""

from __future__ import annotations

import argparse
import json

import torch

from mim.data import ImageDataModule
from mim.eval import fit_linear_classifier, load_encoder_from, pooled_features


def features(encoder: torch.nn.Module, loader, pool: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for imgs, labels, *_ in loader:
        xs.append(pooled_features(encoder, imgs, pool))
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("encoders", nargs="+", help="encoder.safetensors / .json / mim .ckpt / timm:<name>")
    parser.add_argument("--model-kwargs", default="{}", help="JSON kwargs for timm:<name> sources")
    parser.add_argument("--root", default=None, help="dataset root (default: MIM_DATA / the usual places)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--limit-per-class", type=int, default=1000)
    parser.add_argument("--val-limit-per-class", type=int, default=200)
    parser.add_argument("--pool", default="cls", choices=["cls", "mean"])
    parser.add_argument("--batch-size", type=int, default=256, help="images per encoder pass (the train loader "
                        "drops its last incomplete batch)")
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[1e-4])
    args = parser.parse_args()
    dm = ImageDataModule(root=args.root, img_size=args.img_size, batch_size=args.batch_size, num_workers=0,
                         limit_per_class=args.limit_per_class, val_limit_per_class=args.val_limit_per_class,
                         train_augment=False)
    dm.setup("fit")
    print("| encoder | weight decay | train top-1 (%) | test top-1 (%) |\n|---|---:|---:|---:|")
    for source in args.encoders:
        kwargs = json.loads(args.model_kwargs) if source.startswith("timm:") else None
        encoder = load_encoder_from(source, model_kwargs=kwargs)[0].eval()
        train = features(encoder, dm.train_dataloader(), args.pool)
        val = features(encoder, dm.val_dataloader(), args.pool)
        for wd in args.weight_decay:
            probe = fit_linear_classifier(*train, num_classes=dm.num_classes, weight_decay=wd)
            top1 = [100 * (probe.logits(x).argmax(1) == y).float().mean().item() for x, y in (train, val)]
            print(f"| {source} | {wd:g} | {top1[0]:.1f} | {top1[1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
