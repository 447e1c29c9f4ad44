"""One GPU check of ``mim``: every pretraining method and SAE variant trains a few steps in bf16 through
Lightning, the feature extraction writes a store, then the benchmarks run; one markdown table of results.

    bash tools/gpu_check.sh                           # on a CUDA machine: sets the environment, then runs this
    python tools/gpu_check.py                         # checks + benchmarks, about 8 minutes on one GPU
    python tools/gpu_check.py --device cpu --tiny     # tiny models on the CPU: tests this script's code paths
    python tools/gpu_check.py --dry-run               # the plan only, nothing runs

Rows of the table (``Trainer(precision="bf16-mixed")``, synthetic N(0, 1) images: speed, not accuracy):

- pretraining, ViT-B/16 at 224 px (``--tiny``: a 2-block ViT-Tiny/4 at 32 px): MAE, ColorMAE, CAE, MixedAE
  (timm's fused ``scaled_dot_product_attention``; MixedAE's homologous top-k attention cannot use it), MAE
  once more under ``torch.compile``; SparK on ResNet-50 at 224 px in ``channels_last`` (``masked``
  backend) and, when spconv is importable, the ``spconv`` backend. Images/s over the timed steps (after
  ``--warmup`` untimed ones), peak GiB = ``torch.cuda.max_memory_allocated``.
- extraction: ``FeatureExtractor`` + ``FeatureStoreWriter`` (``mim predict``'s path) of cls, mean and patch
  tokens; images/s. The store feeds the next rows.
- SAE variants: every class of ``mim.sae.VARIANTS`` trained by ``SAETraining`` on the store's patch tokens;
  tokens/s.
- benchmarks: ``tools/bench_pretrain.py``, ``tools/bench_sae.py``, ``tools/bench_extract.py`` in
  subprocesses (their own tables are printed after this one). Without CIFAR-10 under ``$MIM_DATA`` they
  read a synthetic CIFAR-10-shaped image folder written to a temporary directory.

A row that fails reports its error and the others still run; the exit code is 1 when one failed.
Every section stops early when the ``--budget`` (seconds) is spent, marking the rest "skipped".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One line of the result table."""

    section: str
    name: str
    detail: str = ""
    batch: str = ""
    speed: str = ""
    peak_gib: str = ""
    wall_s: str = ""
    status: str = "ok"


@dataclass
class Plan:
    """Sizes of one run (``tiny`` on CPU to test the code paths; full on a GPU)."""

    device: str
    tiny: bool
    steps: int
    warmup: int
    precision: str = "bf16-mixed"
    compile_backend: str = "inductor"
    vit: dict[str, Any] = field(default_factory=dict)
    mae_decoder: dict[str, Any] = field(default_factory=dict)
    cae_sizes: dict[str, Any] = field(default_factory=dict)
    spark: dict[str, Any] = field(default_factory=dict)
    batch: int = 64
    spark_batch: int = 64
    extract_encoder: str = ""
    extract_kwargs: dict[str, Any] = field(default_factory=dict)
    extract_images: int = 2048
    img_size: int = 224
    d_sae: int = 16384
    sae_batch: int = 4096
    sae_steps: int = 20


def make_plan(args: argparse.Namespace) -> Plan:
    if args.tiny:
        return Plan(
            device=args.device, tiny=True, steps=args.steps or 2, warmup=args.warmup if args.warmup is not None else 1,
            vit={"backbone": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "backbone_kwargs": {"depth": 2}},
            mae_decoder={"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2},
            cae_sizes={"regressor_depth": 1, "decoder_depth": 1},
            spark={"backbone": "resnet18", "img_size": 64, "decoder_width": 64},
            batch=8, spark_batch=8, extract_encoder="timm:vit_tiny_patch16_224",
            extract_kwargs={"img_size": 32, "patch_size": 4, "depth": 2}, extract_images=32, img_size=32,
            d_sae=256, sae_batch=256, sae_steps=args.steps or 2,
            compile_backend="inductor" if args.device == "cuda" else "eager",  # CPU: the wrapping, not C++ builds
        )
    return Plan(
        device=args.device, tiny=False, steps=args.steps or 10, warmup=args.warmup if args.warmup is not None else 3,
        vit={"backbone": "vit_base_patch16_224", "img_size": 224, "patch_size": 16},
        mae_decoder={"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16},
        cae_sizes={"regressor_depth": 4, "decoder_depth": 4},
        spark={"backbone": "resnet50", "img_size": 224, "decoder_width": 768},
        batch=args.batch or 64, spark_batch=args.batch or 64, extract_encoder="timm:vit_base_patch16_224",
        extract_images=2048, img_size=224, d_sae=16384, sae_batch=4096, sae_steps=args.steps or 20,
    )


# -- measuring ------------------------------------------------------------------------------------------
def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> str:
    import torch

    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device == "cuda" else "-"


def step_timer(device: str, warmup: int, hook: str):
    """A Lightning callback timing the batches after ``warmup`` (``hook``: ``train`` or ``predict``)."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.seen, self.start, self.end = 0, None, None

        def _start(self, *args: Any) -> None:
            if self.seen == warmup:
                synchronize(device)
                self.start = time.perf_counter()

        def _end(self, *args: Any) -> None:
            self.seen += 1
            synchronize(device)
            self.end = time.perf_counter()

        def timed(self) -> tuple[int, float]:
            """(timed batches, seconds)"""
            if self.start is None:
                return 0, 0.0
            return self.seen - warmup, self.end - self.start

    timer = StepTimer()
    setattr(timer, f"on_{hook}_batch_start", timer._start)
    setattr(timer, f"on_{hook}_batch_end", timer._end)
    return timer


def rate(count: int, seconds: float, unit: str) -> str:
    if not seconds:
        return "-"
    value = count / seconds
    return f"{value:,.0f} {unit}" if value >= 10 else f"{value:.2g} {unit}"


def trainer_for(plan: Plan, max_steps: int, callbacks: list, **kwargs: Any):
    import lightning as L

    return L.Trainer(
        accelerator="gpu" if plan.device == "cuda" else "cpu", devices=1, precision=plan.precision,
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks, **kwargs,
    )


def image_loader(count: int, size: int, batch: int, indices: bool = False):
    """A DataLoader over ``count`` synthetic N(0, 1) images ``(3, size, size)`` with labels (and indices)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(count, 3, size, size, generator=g), torch.randint(0, 10, (count,), generator=g)]
    if indices:
        tensors.append(torch.arange(count))
    return DataLoader(TensorDataset(*tensors), batch_size=batch, shuffle=False, drop_last=not indices,
                      pin_memory=torch.cuda.is_available())


def fit_row(plan: Plan, row: Row, build: Callable[[], Any], size: int, batch: int, compile_model: bool = False) -> None:
    """Train ``build()`` for ``warmup + steps`` steps and fill ``row``'s speed (images/s) and memory."""
    import torch

    reset_peak(plan.device)
    model = build()
    if compile_model:
        model = torch.compile(model, backend=plan.compile_backend)
    timer = step_timer(plan.device, plan.warmup, "train")
    total = plan.warmup + plan.steps
    trainer = trainer_for(plan, total, [timer])
    trainer.fit(model, train_dataloaders=image_loader(total * batch, size, batch))
    steps, seconds = timer.timed()
    row.batch = str(batch)
    row.speed = rate(steps * batch, seconds, "img/s")
    row.peak_gib = peak_gib(plan.device)


def check_methods(plan: Plan, rows: list[Row], deadline: float) -> None:
    from functools import partial

    import torch

    from mim.masking import ColorNoiseMask
    from mim.methods import CAE, MAE, MixedAE, SparK

    class ChannelsLastSparK(SparK):
        """SparK with its images and weights in ``channels_last`` (NHWC) memory format."""

        def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
            return (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])

    vit, dec = {**plan.vit, "lr": 1.5e-4}, plan.mae_decoder  # an absolute lr: no datamodule batch size to scale by
    spark = {**plan.spark, "lr": 2e-4}
    methods: list[tuple[str, str, Callable[[], Any], dict[str, Any]]] = [
        ("MAE", "", lambda: MAE(**vit, **dec), {}),
        ("ColorMAE", "green noise mask", lambda: MAE(**vit, **dec, mask=partial(ColorNoiseMask, color="green")), {}),
        ("CAE", "", lambda: CAE(**vit, **plan.cae_sizes), {}),
        ("MixedAE", "homologous top-k attention (not fused)", lambda: MixedAE(**vit, **dec), {}),
        ("MAE", f"torch.compile ({plan.compile_backend})", lambda: MAE(**vit, **dec), {"compile_model": True}),
        ("SparK", "masked backend, channels_last",
         lambda: ChannelsLastSparK(**spark).to(memory_format=torch.channels_last), {}),
    ]
    try:
        import spconv  # noqa: F401

        spconv_skip = "" if plan.device == "cuda" else "skipped: spconv trains on CUDA only"
    except ImportError:
        spconv_skip = "skipped: spconv not installed (gpu_check.sh installs spconv-cu126 from $SPCONV_WHEELS)"
    methods.append(("SparK", "spconv backend", lambda: SparK(**spark, backend="spconv"), {"skip": spconv_skip}))
    for name, detail, build, extra in methods:
        is_spark = name == "SparK"
        size = plan.spark["img_size"] if is_spark else vit["img_size"]
        batch = plan.spark_batch if is_spark else plan.batch
        model_name = f"{plan.spark['backbone'] if is_spark else vit['backbone']} @ {size} px"
        row = Row("pretrain", name, f"{model_name}; {detail}".rstrip("; ") if detail else model_name)
        rows.append(row)
        if extra.pop("skip", ""):
            row.status = spconv_skip
            continue
        run_guarded(row, deadline, lambda: fit_row(plan, row, build, size, batch, **extra))
        if name in ("MAE", "ColorMAE", "CAE") and row.status == "ok" and "compile" not in detail:
            row.detail += "; fused attention" if fused_attention(vit) else "; eager attention"


def fused_attention(vit: dict[str, Any]) -> bool:
    """Whether timm builds this ViT's attention with ``F.scaled_dot_product_attention``."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(vit["backbone"], img_size=vit["img_size"], patch_size=vit["patch_size"],
                                  **vit.get("backbone_kwargs") or {})
    return bool(getattr(model.blocks[0].attn, "fused_attn", False))


def check_extraction(plan: Plan, rows: list[Row], deadline: float, workdir: Path) -> Path | None:
    from mim.features import FeatureExtractor, FeatureStoreWriter

    store = workdir / "store"
    row = Row("extract", "FeatureExtractor + store", f"{plan.extract_encoder}, cls+mean+patch, float32 store")
    rows.append(row)

    def run() -> None:
        reset_peak(plan.device)
        batch = 8 if plan.tiny else 256
        model = FeatureExtractor(plan.extract_encoder, plan.extract_kwargs, tokens=["cls", "mean", "patch"])
        timer = step_timer(plan.device, 1, "predict")
        writer = FeatureStoreWriter(str(store), shard_size=batch * 2, overwrite=True)
        trainer = trainer_for(plan, -1, [timer, writer], default_root_dir=str(workdir))
        loader = image_loader(plan.extract_images, plan.img_size, batch, indices=True)
        trainer.predict(model, dataloaders=loader, return_predictions=False)
        steps, seconds = timer.timed()
        row.batch, row.peak_gib = str(batch), peak_gib(plan.device)
        row.speed = rate(steps * batch, seconds, "img/s")

    run_guarded(row, deadline, run)
    return store if row.status == "ok" else None


def check_saes(plan: Plan, rows: list[Row], deadline: float, store: Path | None) -> None:
    from mim.sae import VARIANTS
    from mim.sae.data import FeatureStoreDataModule
    from mim.sae.module import SAETraining

    for name, cls in VARIANTS.items():
        row = Row("sae", name, f"d_sae {plan.d_sae}, patch tokens of the extraction store")
        rows.append(row)
        if store is None:
            row.status = "skipped: no feature store (the extraction row failed)"
            continue

        def run(cls=cls, row=row) -> None:
            reset_peak(plan.device)
            dm = FeatureStoreDataModule(str(store), tokens="patch", batch_size=plan.sae_batch, num_workers=0)
            model = SAETraining(cls(dm.d_model, plan.d_sae), warmup_steps=0, init_tokens=plan.sae_batch * 4)
            timer = step_timer(plan.device, plan.warmup, "train")
            trainer = trainer_for(plan, plan.warmup + plan.sae_steps, [timer])
            trainer.fit(model, datamodule=dm)
            steps, seconds = timer.timed()
            row.batch, row.peak_gib = f"{plan.sae_batch} tokens", peak_gib(plan.device)
            row.speed = rate(steps * plan.sae_batch, seconds, "tokens/s")

        run_guarded(row, deadline, run)


def run_guarded(row: Row, deadline: float, fn: Callable[[], None]) -> None:
    """Run one check; a failure is written into ``row.status`` (first line of the error) instead of raised."""
    if time.monotonic() > deadline:
        row.status = "skipped: time budget spent"
        return
    start = time.monotonic()
    try:
        fn()
    except Exception as err:  # noqa: BLE001  (a failing row must not stop the others)
        first = (str(err).strip().splitlines() or [""])[0]
        row.status = f"FAILED: {type(err).__name__}: {first}"[:200].replace("|", "/")
        if os.environ.get("MIM_TRACEBACK"):
            traceback.print_exc()
    row.wall_s = f"{time.monotonic() - start:.0f}"


# -- benchmarks -----------------------------------------------------------------------------------------
def benchmarks(plan: Plan) -> list[tuple[str, list[str], int]]:
    """``(script, arguments, timeout s)`` of each benchmark run."""
    if plan.tiny:
        return [
            ("tools/bench_pretrain.py", ["--device", plan.device, "--methods", "MAE", "--batch-size", "8",
                                         "--steps", "1", "--warmup", "0", "--repeats", "1"], 300),
            ("tools/bench_sae.py", ["--device", plan.device, "--d", "32", "--d-sae", "128", "--k", "4",
                                    "--batch", "128", "--steps", "1", "--warmup", "0", "--repeats", "1"], 300),
            ("tools/bench_extract.py", ["--device", plan.device, "--images", "32", "--batch-size", "16",
                                        "--shard-size", "16", "--repeats", "1"], 300),
        ]
    return [
        ("tools/bench_pretrain.py", ["--device", "cuda", "--precision", "bf16", "--batch-size", "256",
                                     "--steps", "10", "--warmup", "3", "--repeats", "3"], 150),
        ("tools/bench_sae.py", ["--device", "cuda", "--bf16", "--d", "768", "--d-sae", "16384", "--k", "32",
                                "--batch", "4096", "--steps", "20", "--warmup", "5", "--repeats", "3",
                                "--variants", "TopKSAE,BatchTopKSAE,JumpReLUSAE", "--no-peers"], 90),
        ("tools/bench_extract.py", ["--device", "cuda", "--images", "10000", "--batch-size", "512",
                                    "--shard-size", "2048", "--repeats", "2"], 120),
    ]


def cifar_root(workdir: Path, per_class: int) -> tuple[str, bool]:
    """``$MIM_DATA`` (or ``../shared/data``) when it holds CIFAR-10, else a synthetic CIFAR-10-shaped folder
    of random 32x32 JPEGs (``per_class`` train and ``per_class // 10 + 1`` test images per class)."""
    root = Path(os.environ.get("MIM_DATA") or REPO.parent / "shared" / "data")
    if (root / "cifar10" / "train").is_dir() and (root / "cifar10" / "test").is_dir():
        return str(root), False
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    fake = workdir / "synthetic_data"
    for split, count in (("train", per_class), ("test", per_class // 10 + 1)):
        for label in range(10):
            folder = fake / "cifar10" / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.jpg", quality=90)
    return str(fake), True


def run_benchmarks(plan: Plan, rows: list[Row], deadline: float, workdir: Path) -> list[tuple[str, str]]:
    """Run each benchmark in a subprocess; returns ``(script, its stdout)`` for the ones that ran."""
    outputs = []
    data, synthetic = cifar_root(workdir, 20 if plan.tiny else 1000)
    env = {**os.environ, "MIM_DATA": data}
    for script, arguments, timeout in benchmarks(plan):
        row = Row("bench", script, " ".join(arguments) + ("; synthetic images" if synthetic else ""))
        rows.append(row)
        left = deadline - time.monotonic()
        if left < 10:
            row.status = "skipped: time budget spent"
            continue
        start = time.monotonic()
        try:
            res = subprocess.run([sys.executable, str(REPO / script), *arguments], cwd=REPO, env=env,
                                 capture_output=True, text=True, timeout=min(timeout, left))  # fmt: skip
        except subprocess.TimeoutExpired:
            row.status = f"FAILED: timed out after {min(timeout, left):.0f} s"
            continue
        row.wall_s = f"{time.monotonic() - start:.0f}"
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            row.status = f"FAILED (exit {res.returncode}): {last}"[:200].replace("|", "/")
            continue
        outputs.append((script, res.stdout))
    return outputs


# -- main -----------------------------------------------------------------------------------------------
def print_table(rows: list[Row], header: str) -> None:
    print(header)
    print()
    print("| section | check | details | batch | speed | peak GiB | wall s | status |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        cells = (r.section, r.name, r.detail, r.batch, r.speed, r.peak_gib, r.wall_s, r.status)
        print("| " + " | ".join(cells) + " |")


def plan_lines(plan: Plan) -> Iterator[str]:
    yield f"device {plan.device}, precision {plan.precision}, {plan.warmup} warm-up + {plan.steps} timed steps per row"
    yield (f"pretrain: MAE, ColorMAE, CAE, MixedAE, MAE + torch.compile on {plan.vit['backbone']} @ "
           f"{plan.vit['img_size']} px (batch {plan.batch}); SparK {plan.spark['backbone']} @ "
           f"{plan.spark['img_size']} px channels_last (+ spconv when installed)")
    yield f"extract: {plan.extract_encoder}, {plan.extract_images} images, cls + mean + patch -> feature store"
    yield (f"sae: every mim.sae.VARIANTS class, d_sae {plan.d_sae}, {plan.sae_batch} tokens/batch, "
           f"{plan.sae_steps} steps")
    for script, arguments, timeout in benchmarks(plan):
        yield f"bench: python {script} {' '.join(arguments)}   (timeout {timeout} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default; refused when torch sees no GPU) or cpu (only with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and batches: a test of the code paths")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per row first")
    parser.add_argument("--batch", type=int, default=None, help="images per pretraining batch (GPU plan)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for everything (default 8 minutes)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pretrain", "extract", "sae", "bench"],
                        help="sections to leave out")
    args = parser.parse_args(argv)
    plan = make_plan(args)
    if args.dry_run:
        print("\n".join(plan_lines(plan)))
        return 0

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: error: no CUDA GPU is visible to torch {torch.__version__} (torch.cuda.is_available() is "
              "False). Fix: run it on a CUDA machine (bash tools/gpu_check.sh), or test this script on a CPU with "
              "--device cpu --tiny.", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.tiny:
        print("gpu_check: error: the full-size plan is for a GPU. Fix: add --tiny for a CPU run.", file=sys.stderr)
        return 2
    os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")
    import logging
    import warnings

    import lightning as L

    warnings.filterwarnings("ignore")  # the table is the output; Lightning's advice is noise here
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    L.seed_everything(0, verbose=False)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        header_device = f"{torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    else:
        header_device = f"CPU, {torch.get_num_threads()} threads"
    start = time.monotonic()
    deadline = start + args.budget
    rows: list[Row] = []
    outputs: list[tuple[str, str]] = []
    workdir = Path(tempfile.mkdtemp(prefix="mim_gpu_check_"))
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Lightning's prints go to stderr; the table to stdout
            if "pretrain" not in args.skip:
                check_methods(plan, rows, deadline)
            store = check_extraction(plan, rows, deadline, workdir) if "extract" not in args.skip else None
            if "sae" not in args.skip:
                check_saes(plan, rows, deadline, store)
            if "bench" not in args.skip:
                outputs = run_benchmarks(plan, rows, deadline, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    versions = f"torch {torch.__version__}, lightning {L.__version__}"
    print_table(rows, f"## mim GPU check: {header_device}; {versions}; {plan.precision}; "
                      f"{time.monotonic() - start:.0f} s")
    for script, out in outputs:
        print(f"\n### {script}\n\n{out.strip()}")
    failed = [r for r in rows if r.status.startswith("FAILED")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
