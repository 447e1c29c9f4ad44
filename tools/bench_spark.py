"""SparK encoder speed and memory: dense supervised pass vs SparK ``masked`` vs SparK ``spconv``.

For ResNet-18 on real CIFAR-10 images, per training step (forward + backward, no optimiser):

- ``dense``: the plain supervised pass of the same timm model (``forward`` + cross-entropy);
- ``masked`` / ``spconv``: SparK's sparse encoder on the visible cells (4 feature maps, a loss on
  them), the backend comparison; plus the whole SparK step (encoder + densify + UNet decoder +
  masked-patch loss) in its own column.

Sizes: CIFAR's 32 px images upsampled to 64 px as ``configs/spark/*`` do (SparK masks the
stride-32 grid: a 32 px input has a single cell, nothing to mask; the 32 px dense pass is printed
for reference), and 224 px. spconv runs its convolutions on one thread whatever the process uses
(its CPU kernels are wrong on more: ``mim.backbones.spconv_backend``), so it is timed with the
process at 1 thread and at ``--threads``. Each row runs in its own subprocess (peak memory: CUDA
``max_memory_allocated``; CPU peak RSS above the size before the model was built). Prints a
markdown table of medians over ``--repeats`` timed steps after ``--warmup``.

    python tools/bench_spark.py                                   # CPU, fp32, the full grid
    python tools/bench_spark.py --sizes 224 --ratios 0.6          # one size, one ratio
    python tools/bench_spark.py --device cuda --precision bf16    # GPU (spconv-cu126 wheel)

``--official DIR`` instead compares with the official SparK code (keyu-tian/SparK, its
``pretrain/encoder.py``, ``decoder.py``, ``spark.py``, ``models/resnet.py`` imported from a local
checkout ``DIR``; nothing of it is copied into this repository) at equal settings: the same timm
ResNet, input size, mask ratio (0.6), decoder width, batch, fp32 and thread count, BN densify norm,
no drop path. It first checks that both give the same loss and gradients on the same weights (mim's
state dict copied across, names mapped) and the same mask: the float32 loss on the whole batch
(relative difference < 1e-4) and, on float64 copies (up to 32 images), the loss (< 1e-9) and every
parameter gradient (relative L2 difference < 1e-6; in float32 the gradients of this step carry ~1e-3
relative rounding in either code), printing the differences and ``MISMATCH`` (exit status 1); then it times fwd+bwd steps of the dense
supervised pass, the official SparK, mim with ``channels_last=False`` and mim's default
(``channels_last=True``), interleaved step by step in one process, and prints the medians, their ratio to
the official one, and the median of the per-step ratios to the official step of the same round ("paired"):

    git --git-dir <bare SparK clone> archive HEAD pretrain | tar -x -C /tmp/spark_official
    python tools/bench_spark.py --official /tmp/spark_official --sizes 64 224 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
BATCH = {32: 128, 64: 128, 224: 16}


def real_batch(batch_size: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` real CIFAR-10 training images resized to ``size`` px, and their labels."""
    from mim.data import ImageDataModule

    root = os.environ.get("MIM_DATA") or str(REPO.parent / "shared" / "data")
    dm = ImageDataModule(root=root, img_size=size, batch_size=batch_size, num_workers=0, limit_per_class=batch_size // 10 + 1)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))[:2]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def median_ms(fn, device: str, warmup: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(args: argparse.Namespace) -> dict:
    """One row (runs in the child process)."""
    import timm

    from mim.methods import SparK

    device, size, mode = args.device, args.size, args.mode
    batch = args.batch_size or BATCH.get(size, 16)
    imgs, labels = (t.to(device) for t in real_batch(batch, size))
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    base_rss = rss_mib()
    row = {"size": size, "batch": batch, "mode": mode, "threads": torch.get_num_threads(), "ratio": args.ratio}

    def autocast():
        return torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None)

    if mode == "dense":
        model = timm.create_model(args.backbone, num_classes=10).to(device)

        def dense_step() -> None:
            with autocast():
                loss = F.cross_entropy(model(imgs), labels)
            loss.backward()

        row["encoder_ms"] = row["step_ms"] = median_ms(dense_step, device, args.warmup, args.repeats)
    else:
        model = SparK(args.backbone, img_size=size, backend=mode, mask_ratio=args.ratio, decoder_width=args.decoder_width)
        model = model.to(device)
        mask = model.sample_mask(batch, torch.Generator().manual_seed(0))
        row["masked_cells"] = f"{int(mask[0].sum())}/{mask.shape[1]}"
        active = ~mask.view(batch, 1, *model.grid_hw)

        def encoder_step() -> None:
            with autocast():
                feats = model.sparse_encoder(imgs, active)
                loss = sum(f.float().square().mean() for f in feats)
            loss.backward()

        def spark_step() -> None:
            with autocast():
                loss = model(imgs, mask)[0]
            loss.backward()

        row["encoder_ms"] = median_ms(encoder_step, device, args.warmup, args.repeats)
        row["step_ms"] = median_ms(spark_step, device, args.warmup, args.repeats)
    if device == "cuda":
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss
    return row


# -- the official SparK code, side by side ---------------------------------------------------------
def import_official(root: Path) -> types.SimpleNamespace:
    """The official modules from a checkout (``root`` or ``root/pretrain``), with two shims: ``decoder.py``
    imports ``utils.misc`` for ``is_pow2n`` only (the real module needs pytz, tensorboard and the
    distributed helpers), and ``models/resnet.py`` (its hooks on timm's ResNet: ``forward(x, hierarchical)``,
    ``get_downsample_ratio``, ``get_feature_map_channels``) is loaded alone, without ``models/__init__.py``
    (which registers its own ConvNeXt with timm)."""
    pretrain = root / "pretrain" if (root / "pretrain" / "spark.py").is_file() else root
    if not (pretrain / "spark.py").is_file() or not (pretrain / "encoder.py").is_file():
        raise SystemExit(f"--official {root}: no pretrain/spark.py and pretrain/encoder.py there (a keyu-tian/SparK checkout)")
    misc = types.ModuleType("utils.misc")
    misc.is_pow2n = lambda x: x > 0 and (x & (x - 1) == 0)  # the official one-liner
    utils = types.ModuleType("utils")
    utils.misc = misc
    saved = {k: sys.modules.get(k) for k in ("utils", "utils.misc")}
    sys.modules.update({"utils": utils, "utils.misc": misc})
    sys.path.insert(0, str(pretrain))
    try:
        spec = importlib.util.spec_from_file_location("spark_official_resnet", pretrain / "models" / "resnet.py")
        resnet_hooks = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(resnet_hooks)
        import decoder  # the official modules, from the checkout
        import encoder
        import spark
    finally:
        sys.path.remove(str(pretrain))
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return types.SimpleNamespace(encoder=encoder, decoder=decoder, spark=spark, root=pretrain)


def official_name(name: str) -> str:
    """mim's ``SparK`` state-dict name -> the official ``SparK``'s."""
    prefixes = {
        "sparse_encoder.model.": "sparse_encoder.sp_cnn.",
        "decoder.norms.": "densify_norms.",
        "decoder.mask_tokens.": "mask_tokens.",
        "decoder.projs.": "densify_projs.",
        "decoder.head.": "dense_decoder.proj.",
    }
    for ours, theirs in prefixes.items():
        if name.startswith(ours):
            return theirs + name[len(ours):]
    if name.startswith("decoder.blocks."):  # Sequential(up, conv, bn, relu6, conv, bn) -> up_sample + conv.(0..4)
        block, layer, rest = name[len("decoder.blocks."):].split(".", 2)
        inner = "up_sample" if layer == "0" else f"conv.{int(layer) - 1}"
        return f"dense_decoder.dec.{block}.{inner}.{rest}"
    raise KeyError(name)


def build_official(mods: types.SimpleNamespace, ours, backbone: str, size: int, width: int, ratio: float):
    """The official SparK (BN densify norm, no SyncBN) with the weights of mim's ``ours``."""
    import timm

    cnn = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")  # official kwargs, no drop path
    with contextlib.redirect_stdout(sys.stderr):  # its constructors print
        enc = mods.encoder.SparseEncoder(cnn, input_size=size, sbn=False)
        dec = mods.decoder.LightDecoder(enc.downsample_raito, width=width, sbn=False)
        model = mods.spark.SparK(enc, dec, mask_ratio=ratio, densify_norm="bn", sbn=False)
    state = {official_name(k): v for k, v in ours.state_dict().items()}
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or set(result.missing_keys) - {"imn_m", "imn_s", "norm_black"}:
        raise SystemExit(f"state dict mapping is off: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return model


def compare_official(args: argparse.Namespace) -> int:
    """Loss check + interleaved timing against the official code; returns the exit status."""
    import timm

    from mim.backbones.sparse import MASK_STRIDE
    from mim.methods import SparK
    from mim.methods.mae import pixel_target

    torch.set_num_threads(args.threads)
    mods = import_official(Path(args.official).resolve())
    ratio = args.ratios[0] if len(args.ratios) == 1 else 0.6
    device, status, tables = args.device, 0, []
    for size in args.sizes:
        batch = args.batch_size or BATCH.get(size, 16)
        imgs, labels = (t.to(device) for t in real_batch(batch, size))
        torch.manual_seed(0)
        mim_cl = SparK(args.backbone, img_size=size, mask_ratio=ratio, decoder_width=args.decoder_width, densify_norm="bn")
        mim_nchw = SparK(args.backbone, img_size=size, mask_ratio=ratio, decoder_width=args.decoder_width,
                         densify_norm="bn", channels_last=False)  # fmt: skip
        mim_nchw.load_state_dict(mim_cl.state_dict())
        official = build_official(mods, mim_cl, args.backbone, size, args.decoder_width, ratio)
        dense = timm.create_model(args.backbone, num_classes=10)
        models = {"official": official, "mim_nchw": mim_nchw, "mim": mim_cl, "dense": dense}
        for m in models.values():
            m.to(device).train()
        mask = mim_cl.sample_mask(batch, torch.Generator().manual_seed(0)).to(device)
        active = ~mask.view(batch, 1, *mim_cl.grid_hw)

        def step(name: str, models=models, imgs=imgs, labels=labels, mask=mask, active=active) -> torch.Tensor:
            model = models[name]
            if name == "official":
                loss = model(imgs, active_b1ff=active)
            elif name == "dense":  # forward_features + head: the official hooks replace timm ResNet.forward
                loss = F.cross_entropy(model.forward_head(model.forward_features(imgs)), labels)
            else:
                loss = model(imgs, mask)[0]
            loss.backward()
            return loss.detach()

        # The same loss (float32, the whole batch) and the same gradients (float64, up to 32 images: in
        # float32 this step's gradients carry ~1e-3 relative rounding in either code) on the same weights
        # and mask, on copies (the BN running statistics of the timed models stay untouched).
        n64 = min(batch, 32)
        imgs64, mask64, active64 = imgs[:n64].double(), mask[:n64], active[:n64]
        check = {}
        for name in ("official", "mim_nchw", "mim"):
            loss32 = models[name]
            models[name] = copy.deepcopy(loss32)
            loss32, models[name] = step(name).double().item(), loss32
            model64 = copy.deepcopy(models[name]).double()
            if name == "official":
                loss64 = model64(imgs64, active_b1ff=active64)
            else:  # mim's masked_mse computes in float32: the same formula in float64 here
                per_patch = (model64(imgs64, mask64)[1] - pixel_target(imgs64, MASK_STRIDE, True)).square().mean(-1)
                loss64 = (per_patch * mask64).sum() / mask64.sum()
            loss64.backward()
            grads = {k: p.grad for k, p in model64.named_parameters() if p.grad is not None}
            if name != "official":
                grads = {official_name(k): v for k, v in grads.items()}
            check[name] = (loss32, loss64.item(), grads)
        ref32, ref64, ref_grads = check.pop("official")
        lines = [f"{size} px: official loss {ref32:.8f} (float32, {batch} images), {ref64:.12f} (float64, {n64} images)"]
        for name, (loss32, loss64, grads) in check.items():
            rel32, rel64 = abs(loss32 - ref32) / abs(ref32), abs(loss64 - ref64) / abs(ref64)
            diffs = sorted((float((grads[k] - g).norm() / g.norm()), k) for k, g in ref_grads.items() if g.norm() > 0)
            ok = rel32 < 1e-4 and rel64 < 1e-9 and set(grads) == set(ref_grads) and diffs[-1][0] < 1e-6
            status |= not ok
            lines.append(f"  {name}: loss relative difference {rel32:.1e} (float32), {rel64:.1e} (float64); float64 "
                         f"gradients of {len(grads)} parameters: relative L2 difference median {diffs[len(diffs) // 2][0]:.1e}, "
                         f"largest {diffs[-1][0]:.1e} ({diffs[-1][1]}) -> {'ok' if ok else 'MISMATCH'}")  # fmt: skip
        print("\n".join(lines), flush=True)

        times = {name: [] for name in models}
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        for rep in range(args.warmup + args.repeats):
            for name, model in models.items():  # interleaved: the rows see the same machine load
                model.zero_grad(set_to_none=True)
                sync()
                start = time.perf_counter()
                step(name)
                sync()
                if rep >= args.warmup:
                    times[name].append(1000 * (time.perf_counter() - start))
            print(f"  {size} px: step {rep + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
        med = {name: statistics.median(t) for name, t in times.items()}
        # each step against the official step of the same round: robust to the host's speed drifting over the run
        paired = {name: statistics.median(a / b for a, b in zip(t, times["official"])) for name, t in times.items()}
        masked = f"{int(mask[0].sum())}/{mask.shape[1]}"
        labels_ = {"dense": "dense supervised pass (timm, NCHW)", "official": "official SparK (keyu-tian/SparK)",
                   "mim_nchw": "mim SparK, channels_last=False", "mim": "mim SparK (default: channels_last)"}  # fmt: skip
        for name in ("dense", "official", "mim_nchw", "mim"):
            tables.append(f"| {size} px | {batch} | {masked} | {labels_[name]} | {med[name]:.0f} | "
                          f"{med[name] / med['official']:.2f}x | {paired[name]:.2f}x | {med[name] / med['dense']:.2f}x |")  # fmt: skip
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
    print(f"\n{args.backbone}, fp32, {dev}, decoder width {args.decoder_width}, mask ratio {ratio}, BN densify norm; "
          f"fwd+bwd per step, median of {args.repeats} after {args.warmup} warm-up, rows interleaved")  # fmt: skip
    print("| input | batch | cells masked | step | ms | vs official | paired | vs dense |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    print("\n".join(tables))
    return status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.6, 0.75])
    parser.add_argument("--modes", nargs="+", default=["masked", "spconv"], choices=["masked", "spconv"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 128 at 32/64 px, 16 at 224 px")
    parser.add_argument("--decoder-width", type=int, default=384)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="best CPU thread count")
    parser.add_argument("--official", metavar="DIR", default=None,
                        help="a keyu-tian/SparK checkout: compare with the official code instead (see above)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ratio", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.official:
        sys.exit(compare_official(args))
    if args.child:
        torch.set_num_threads(args.threads)
        print(json.dumps(measure(args)))
        return
    jobs = []
    for size in args.sizes:
        if size == 64:
            jobs.append(("dense", 32, 0.0, args.threads))
        jobs.append(("dense", size, 0.0, args.threads))
        for mode in args.modes:
            thread_counts = sorted({1, args.threads}) if mode == "spconv" and args.device == "cpu" else [args.threads]
            for threads in thread_counts:
                jobs += [(mode, size, ratio, threads) for ratio in args.ratios]
    rows = []
    for mode, size, ratio, threads in jobs:
        cmd = [sys.executable, __file__, "--child", "--mode", mode, "--size", str(size), "--ratio", str(ratio),
               "--threads", str(threads), "--backbone", args.backbone, "--decoder-width", str(args.decoder_width),
               "--device", args.device, "--precision", args.precision, "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)] + (["--batch-size", str(args.batch_size)] if args.batch_size else [])  # fmt: skip
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  measured {mode} {size} px ratio {ratio} threads {threads}", file=sys.stderr)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"{args.backbone}, {args.precision}, {device}; fwd+bwd per step, median of {args.repeats} after {args.warmup} warmup")
    print("| input | batch | pass | threads | mask ratio (cells masked) | encoder ms | vs dense | SparK step ms | peak MiB |")
    print("|---|---:|---|---:|---|---:|---:|---:|---:|")
    dense = {(r["size"], r["threads"]): r["encoder_ms"] for r in rows if r["mode"] == "dense"}
    for r in rows:
        base = dense.get((r["size"], args.threads))
        rel = f"{r['encoder_ms'] / base:.2f}x" if base else "-"
        ratio = "-" if r["mode"] == "dense" else f"{r['ratio']} ({r['masked_cells']})"
        print(f"| {r['size']} px | {r['batch']} | {r['mode']} | {r['threads']} | {ratio} | {r['encoder_ms']:.0f} | "
              f"{rel} | {r['step_ms']:.0f} | {r['peak_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
