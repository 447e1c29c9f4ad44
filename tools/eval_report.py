"""Markdown table of linear-probe, kNN (and fine-tune) top-1 for one or more encoders on CIFAR-10.

Each number comes from the shipped configs run through ``mim`` itself (in-process ``cli_main``):
``configs/eval/knn_cifar10.yaml`` (``mim validate``), ``configs/eval/linear_probe_cifar10.yaml`` and,
with ``--finetune``, ``configs/eval/finetune_cifar10.yaml`` (``mim fit``), with the data size and
epochs given here. The random-init baseline row (the same timm model with random weights) comes first.

    python tools/eval_report.py --encoders runs/<run>/lightning_logs/version_0/encoder.safetensors
    python tools/eval_report.py --encoders a.safetensors b.ckpt --baseline timm:resnet18 --img-size 64
    python tools/eval_report.py --encoders e.safetensors --finetune --limit-per-class 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from mim.cli import cli_main
from mim.eval.encoders import TIMM_PREFIX, load_encoder_from

REPO = Path(__file__).resolve().parents[1]
EVAL = REPO / "configs" / "eval"


def data_args(args: argparse.Namespace, batch_size: int) -> list[str]:
    out = ["--data.init_args.img_size", str(args.img_size), "--data.init_args.batch_size", str(batch_size),
           "--data.init_args.val_limit_per_class", str(args.val_limit_per_class)]  # fmt: skip
    if args.limit_per_class:
        out += ["--data.init_args.limit_per_class", str(args.limit_per_class)]
    if args.num_workers is not None:
        out += ["--data.init_args.num_workers", str(args.num_workers)]
    return out


def model_args(source: str, kwargs: dict) -> list[str]:
    return ["--model.init_args.encoder", source, "--model.init_args.model_kwargs", json.dumps(kwargs)]


def evaluate(source: str, kwargs: dict, args: argparse.Namespace, root: Path) -> dict[str, float]:
    """knn/top1, probe val/top1 (and fine-tune val/top1) of one encoder, in [0, 1]."""
    common = ["--trainer.default_root_dir", str(root), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    knn = cli_main(["validate", "-c", str(EVAL / "knn_cifar10.yaml"), *common, *model_args(source, kwargs),
                    *data_args(args, args.batch_size)])  # fmt: skip
    result = {"knn": float(knn.trainer.callback_metrics["knn/top1"])}
    probe = cli_main(["fit", "-c", str(EVAL / "linear_probe_cifar10.yaml"), *common, *model_args(source, kwargs),
                      *data_args(args, args.batch_size), "--trainer.max_epochs", str(args.probe_epochs),
                      "--model.init_args.warmup_epochs", str(max(1, args.probe_epochs // 9)),
                      "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"])  # fmt: skip
    result["probe"] = float(probe.trainer.callback_metrics["val/top1"])
    if args.finetune:
        tune = cli_main(["fit", "-c", str(EVAL / "finetune_cifar10.yaml"), *common, *model_args(source, kwargs),
                         *data_args(args, args.batch_size // 2), "--trainer.max_epochs", str(args.finetune_epochs),
                         "--model.init_args.warmup_epochs", str(max(1, args.finetune_epochs // 20)),
                         "--trainer.enable_checkpointing", "false", "--trainer.callbacks", "[]"])  # fmt: skip
        result["finetune"] = float(tune.trainer.callback_metrics["val/top1"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", nargs="+", required=True, help="encoder.safetensors / .json / mim .ckpt files")
    parser.add_argument("--baseline", default=None, help="random-init timm model (default: the first encoder's)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--limit-per-class", type=int, default=1000, help="train images per class (0: all)")
    parser.add_argument("--val-limit-per-class", type=int, default=200)
    parser.add_argument("--probe-epochs", type=int, default=30)
    parser.add_argument("--finetune", action="store_true")
    parser.add_argument("--finetune-epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256, help="probe / kNN batch (fine-tune: half)")
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # the CLI runs below get their own arguments

    _, info = load_encoder_from(args.encoders[0])
    baseline = args.baseline or TIMM_PREFIX + info["model_name"]
    kwargs = {k: v for k, v in info["model_kwargs"].items() if k != "num_classes"}
    rows = [(f"random init (`{baseline}`)", baseline, kwargs)]
    rows += [(f"`{Path(e).parent.name}/{Path(e).name}`", str(e), {}) for e in args.encoders]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, source, model_kwargs in rows:
            results.append((name, evaluate(source, model_kwargs, args, Path(tmp))))
    train = f"{args.limit_per_class}/class" if args.limit_per_class else "all"
    print(f"CIFAR-10 at {args.img_size} px, train images {train}, {args.val_limit_per_class * 10} test images; "
          f"probe {args.probe_epochs} epochs" + (f", fine-tune {args.finetune_epochs} epochs" if args.finetune else ""))  # fmt: skip
    header = "| encoder | linear probe top-1 (%) | kNN top-1 (%) |" + (" fine-tune top-1 (%) |" if args.finetune else "")
    print(header)
    print("|---|---:|---:|" + ("---:|" if args.finetune else ""))
    for name, r in results:
        cells = [f"{100 * r['probe']:.1f}", f"{100 * r['knn']:.1f}"] + ([f"{100 * r['finetune']:.1f}"] if args.finetune else [])
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
