"""Markdown table of an analysis chain run (``tools/analyse_cifar10.sh``): per block, the SAE's last validation
metrics (``val/fvu``, ``val/l0``, ``val/dead_latents``: ``mim/sae/metrics.py``) and its splice-in evaluation
(``splice.json`` of ``mim.sae.splice_eval.SpliceEvaluation``: top-1 clean / spliced, accuracy recovered, KL).

    python tools/analysis_table.py runs/analyse_cifar10 3 7 11
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path


def newest(folder: Path, name: str) -> Path:
    """The ``name`` file of the newest ``lightning_logs/version_N`` under ``folder``."""
    found = sorted(folder.glob(f"lightning_logs/version_*/{name}"), key=lambda p: int(p.parent.name.split("_")[1]))
    if not found:
        raise SystemExit(f"mim: error: no {name} under {folder}/lightning_logs. Fix: run tools/analyse_cifar10.sh first.")
    return found[-1]


def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every column of a Lightning ``CSVLogger`` ``metrics.csv``."""
    values: dict[str, float] = {}
    with metrics_csv.open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="OUT folder of tools/analyse_cifar10.sh")
    parser.add_argument("layers", type=int, nargs="+", help="blocks the chain extracted")
    args = parser.parse_args()
    print("| block | SAE val FVU | SAE val L0 | dead latents | top-1 clean | top-1 spliced | top-1 zero-abl. "
          "| top-1 mean-abl. | acc. recovered (zero) | acc. recovered (mean) | KL(clean ‖ spliced) nats |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for layer in args.layers:
        sae = last_values(newest(args.out / "sae" / f"layer_{layer}", "metrics.csv"))
        s = json.loads(newest(args.out / "splice" / f"layer_{layer}", "splice.json").read_text())
        print(f"| {layer} | {sae['val/fvu']:.3f} | {sae['val/l0']:.1f} | {sae['val/dead_latents']:.3f} "
              f"| {s['top1_clean']:.3f} | {s['top1_recon']:.3f} | {s['top1_zero']:.3f} | {s['top1_mean']:.3f} "
              f"| {s['accuracy_recovered_zero']:.3f} | {s['accuracy_recovered_mean']:.3f} | {s['kl_recon']:.4f} |")


if __name__ == "__main__":
    main()
