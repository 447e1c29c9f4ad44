"""Training-step speed of every mim SAE variant against the forward-matmul floors and peer libraries.

What one row times (the median of ``--repeats`` single steps after ``--warmup`` untimed ones):

- ``floor (a)``: the forward encoder matmul alone, ``z = x W_enc^T + b_enc`` (N x d x d_sae), no gradient.
- ``floor (b)``: (a) plus the row-wise top-k of ``z`` (``topk(k, sorted=False)``), once as one (N, d_sae) block
  and once in 1024-row blocks written into one reused buffer (as :func:`mim.sae.kernels.select_linear` computes
  it); the ratio column ``x (b)`` divides by the faster of the two. Issue goal: TopK <= 1.3x (b).
- ``mim <Variant>``: the full training step as :class:`mim.sae.module.SAETraining` runs it: ``normalize``,
  ``loss``, the finite-loss check, ``update_firing``, ``zero_grad``, backward, ``remove_parallel_grad_``,
  ``torch.optim.Adam`` (lr 2e-4, betas (0.9, 0.999), eps 6.25e-10, fused, as ``configure_optimizers`` builds it
  with :func:`mim.sae.module.sae_adam`; the peers use torch's default implementation, as their trainers) and
  ``normalize_decoder_``. Every class of :data:`mim.sae.VARIANTS` is built with
  the size's ``k`` where its constructor takes one (:data:`KNOWN_ARGS`); a class not listed there is built
  with ``(d_model, d_sae[, k])`` when all its other arguments have defaults, else skipped with the reason.
  The threshold variants (ReLU + L1, JumpReLU) have two rows: from initialisation, where about half the
  latents fire (their dense step, as early in training), and ``(sparse state: l0 ~ k)``, a trained-like code
  at TopK's ``l0`` (:func:`sparse_state_`; their sparse step). The peers' steps are dense matmuls whose time
  does not depend on the code's sparsity.
- Peers (only where importable; install them in a separate environment, never in mim's):

  * overcomplete ``TopKSAE`` / ``BatchTopKSAE`` (``top_k = k * N``: its top-k is over the whole batch) /
    ``JumpSAE`` / ``MpSAE`` (``k`` steps) / ``RATopKSAE`` (the archetypal SAE, ``points`` = the same
    candidates as mim's): the loop body of ``overcomplete.sae.train_sae`` (forward, criterion on
    ``get_dictionary()``, ``DeadCodeTracker.update``, backward, Adam). Criterion: the MSE
    ``(x - x_hat).square().mean()`` for every model (overcomplete's ``top_k_auxiliary_loss`` would add a dense
    top-(d_sae/2), so the plain MSE is the cheapest step of its family), plus the L0 penalty
    ``heaviside(relu(z_pre), exp(thresholds)).sum(-1).mean()`` for ``JumpSAE``.
  * SAELens ``TopKTrainingSAE`` (default, and with ``use_sparse_activations=True``), ``BatchTopKTrainingSAE``,
    ``JumpReLUTrainingSAE``, ``MatryoshkaBatchTopKTrainingSAE`` (mim's prefixes as widths),
    ``StandardTrainingSAE`` (ReLU + L1), ``MatchingPursuitTrainingSAE`` (``k`` iterations, no early stop) and
    ``AbsTopKTrainingSAE``: the body of ``SAETrainer._train_step`` (``training_forward_pass`` with its own
    losses, no dead latents, the firing statistics, backward, Adam, ``zero_grad``).

  Peers run without gradient clipping (both libraries' trainers clip at norm 1, mim does not; ``--peer-clip``
  adds it), in float32, on the same batches, threads and sizes. The ``mim / best peer`` column is mim's
  tokens/s over the fastest peer row of the same family (issue goal: >= 2x).

Inputs: every timed step takes the next batch of a feature store on disk, read through the loader SAE training
uses (:class:`mim.sae.data.FeatureStoreDataset`: shuffled shards, memory-mapped reads, float32 copies), so no
step sees a cache-warm tensor. Without ``--store`` a synthetic store is written once per size under
``--store-dir`` with :class:`mim.features.store.ShardWriter` (``--store-batches`` batches of patch tokens:
anisotropic Gaussian features ``mu + (g * s) Q``, ``s_i`` ~ ``i^-1/2``, ``Q`` a random rotation, float32).
Fetching a batch is not part of the timed step (its median is printed separately).

Rows of one size are timed round-robin (each repeat times every row once, the starting row rotating), so load
drifts of a shared machine hit all rows alike. When the rows' parameters and optimizer states together would
exceed ``--max-mem-gb`` (ViT-B), rows are timed in groups, one family (mim variant + its peers + the floors)
at a time.

Environment for the peers (the project's .venv stays free of them)::

    python3 -m venv /work/bench_venv
    echo "import site; site.addsitedir('/work/main/.venv/lib/python3.11/site-packages')" \\
        > /work/bench_venv/lib/python3.11/site-packages/zz_mim_venv.pth    # reuse mim's torch and deps
    /work/bench_venv/bin/pip install -c constraints.txt overcomplete==0.3.0 sae-lens==6.54.12
    /work/bench_venv/bin/pip install "matplotlib<3.9"                      # overcomplete 0.3.0 imports cm.get_cmap

    /work/bench_venv/bin/python tools/bench_sae.py --size tiny             # with peers
    python tools/bench_sae.py --size tiny --repeats 2 --no-peers           # project venv, mim rows only
    python tools/bench_sae.py --size vitb --repeats 3 --variants TopKSAE,BatchTopKSAE,JumpReLUSAE
    python tools/bench_sae.py --size tiny --no-peers --variants TopKSAE --profile 8   # where the step goes
"""

from __future__ import annotations

import argparse
import datetime
import gc
import inspect
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# the peers' own warnings (SAELens: sparse invariant checks, MatchingPursuit's decoder_init_norm) would break the table
warnings.filterwarnings("ignore", message="Sparse invariant checks")
warnings.filterwarnings("ignore", message="decoder_init_norm must be set")

Step = Callable[[torch.Tensor], None]


@dataclass(frozen=True)
class Size:
    name: str
    d: int
    d_sae: int
    k: int
    batch: int
    grid: tuple[int, int]  # patch grid of the synthetic store's "images"


SIZES = {
    "tiny": Size("ViT-Tiny", 192, 3072, 32, 4096, (8, 8)),
    "vitb": Size("ViT-B", 768, 24576, 64, 4096, (14, 14)),
    "smoke": Size("smoke", 64, 512, 8, 1024, (4, 4)),  # a seconds-long check that every row runs
}

#: Constructor arguments (besides d_model, d_sae) of the variants the bench knows, from the size.
KNOWN_ARGS: dict[str, Callable[[Size], dict[str, Any]]] = {
    "TopKSAE": lambda s: {"k": s.k},
    "AbsTopKSAE": lambda s: {"k": s.k},
    "BatchTopKSAE": lambda s: {"k": s.k},
    "MatryoshkaSAE": lambda s: {"k": s.k},
    "TopAFASAE": lambda s: {"k_max": s.k},  # the same cap as TopK's k (its codes fill a larger cap on real features)
    "ReLUSAE": lambda s: {},
    "JumpReLUSAE": lambda s: {},
    "MPSAE": lambda s: {"steps": s.k},
    "FeatureChoiceSAE": lambda s: {"k": s.k},
    "MutualChoiceSAE": lambda s: {"k": s.k},
    "MSAE": lambda s: {"ks": sorted({max(s.k // 8, 1), max(s.k // 4, 1), max(s.k // 2, 1), s.k})},
    "ArchetypalSAE": lambda s: {"k": s.k, "n_candidates": n_candidates(s), "candidates": "sample"},
}

#: The family of each mim variant (rows of the same family are compared in the ``mim / best peer`` column).
FAMILY = {
    "TopKSAE": "TopK", "BatchTopKSAE": "BatchTopK", "JumpReLUSAE": "JumpReLU", "MatryoshkaSAE": "Matryoshka",
    "ReLUSAE": "ReLU-L1", "MPSAE": "MP", "AbsTopKSAE": "AbsTopK", "ArchetypalSAE": "Archetypal",
}

LR, BETAS, EPS = 2e-4, (0.9, 0.999), 6.25e-10  # SAETraining's defaults


def n_candidates(s: Size) -> int:
    """Archetype candidates of the archetypal SAEs: d_sae, at most 4096 (a (d_sae, n) mixing matrix)."""
    return min(s.d_sae, 4096)


@dataclass
class Row:
    name: str
    kind: str  # "floor", "mim" or "peer"
    family: str
    build: Callable[[], Step]
    step: Step | None = None
    times: list[float] = field(default_factory=list)
    note: str = ""  # why the row has no time

    @property
    def ms(self) -> float | None:
        return statistics.median(self.times) * 1e3 if self.times else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=[*SIZES, "all"], default="tiny",
                   help="tiny: ViT-Tiny, vitb: ViT-B, all: both, smoke: a small check that every row runs")
    p.add_argument("--variants", default="all", help="comma-separated mim class names (default: every registered one)")
    p.add_argument("--no-peers", action="store_true", help="skip overcomplete and SAELens rows")
    p.add_argument("--peer-clip", action="store_true", help="peers clip gradients at norm 1 as their trainers do")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per row first")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--store", default=None, help="read this feature store (patch tokens) instead of a synthetic one")
    p.add_argument("--store-dir", default="/tmp/mim_bench_sae_stores", help="where synthetic stores are written")
    p.add_argument("--store-batches", type=int, default=16, help="batches of tokens in a synthetic store")
    p.add_argument("--init-tokens", type=int, default=16384, help="tokens of the SAEs' initialisation sample")
    p.add_argument("--max-step-s", type=float, default=60.0, help="drop a row whose warm-up step takes longer")
    p.add_argument("--max-mem-gb", type=float, default=6.0,
                   help="time rows family by family when all rows' parameters + Adam states would exceed this")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--steps", type=int, default=1, help="steps per timed sample (its mean is one sample)")
    p.add_argument("--bf16", action="store_true", help="run every step under bf16 autocast (as bf16-mixed)")
    p.add_argument("--candidate-search", default=None, metavar="S1,S2",
                   help="one row per listed candidate_search (auto, threshold, rows) for the variants that take it "
                        "(BatchTopK, Matryoshka, Mutual Choice)")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile this many steps of each mim row (torch.profiler) and print its "
                        "operators by self time: where a step goes beyond the floors")
    custom = p.add_argument_group("a custom size instead of --size (any of these given: the rest from --size)")
    custom.add_argument("--d", type=int, default=None, help="feature width d_model")
    custom.add_argument("--d-sae", type=int, default=None, help="latents")
    custom.add_argument("--k", type=int, default=None, help="active latents per token")
    custom.add_argument("--batch", type=int, default=None, help="tokens per step")
    args = p.parse_args(argv)
    if any(v is not None for v in (args.d, args.d_sae, args.k, args.batch)):
        base = SIZES["tiny" if args.size == "all" else args.size]
        args.custom = Size("custom", args.d or base.d, args.d_sae or base.d_sae, args.k or base.k,
                           args.batch or base.batch, base.grid)
    else:
        args.custom = None
    return args


# ------------------------------------------------------------------------------------------------ data
def synthetic_store(size: Size, folder: Path, batches: int) -> Path:
    """Write (once) a feature store of anisotropic Gaussian patch tokens of width ``size.d``; returns its folder."""
    from mim.features.store import (
        FeatureStore,
        FeatureStoreError,
        ShardWriter,
        clear_store,
        read_metadata,
        write_metadata,
    )

    per_image = size.grid[0] * size.grid[1]
    images = -(-batches * size.batch // per_image)
    spec = {"kind": "anisotropic-gaussian", "d": size.d, "grid": list(size.grid), "images": images, "seed": 0}
    folder = folder / f"d{size.d}-grid{size.grid[0]}x{size.grid[1]}-images{images}"
    try:
        meta = read_metadata(folder)
        if meta is not None and meta.get("synthetic") == spec:
            FeatureStore(folder)
            return folder
    except FeatureStoreError as err:
        print(f"writing {folder} again: {err}")
    clear_store(folder)
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(size.d, size.d, generator=gen))
    scale = torch.arange(1, size.d + 1, dtype=torch.float32).pow(-0.5) * math.sqrt(size.d / 4)
    mu = 0.5 * torch.randn(size.d, generator=gen)
    shard_images = max(1, 8192 // per_image)
    writer = ShardWriter(folder, 0, shard_size=shard_images)
    for start in range(0, images, shard_images):
        n = min(shard_images, images - start)
        g = torch.randn(n * per_image, size.d, generator=gen)
        patch = (mu + (g * scale) @ q).reshape(n, per_image, size.d)
        writer.add({"patch": patch, "labels": torch.zeros(n, dtype=torch.long),
                    "indices": torch.arange(start, start + n)})
    shards = writer.close()
    write_metadata(folder, {
        "encoder": {"model_name": "synthetic", "model_kwargs": {}, "weights_sha256": None}, "layer": 0,
        "tokens": ["patch"], "dtype": "float32", "img_size": None, "dataset": "synthetic", "split": "train",
        "data": None, "shard_size": shard_images, "high_norm_factor": None, "preprocessing": None,
        "d_model": size.d, "patch_grid": list(size.grid), "num_registers": 0, "num_layers": 0, "norm": False,
        "count": images, "order": "written", "world_size": 1, "shards": shards, "high_norm_tokens": None,
        "synthetic": spec,
    })
    return folder


class Batches:
    """An endless stream of (batch, d) float32 token batches of a store, through mim's SAE loader; records
    the time each fetch took."""

    def __init__(self, path: Path, batch: int, device: str) -> None:
        from mim.features.store import FeatureStore
        from mim.sae.data import FeatureStoreDataset

        self.store = FeatureStore(path)
        tokens = "patch" if "patch" in self.store.tokens else self.store.tokens[0]
        self.dataset = FeatureStoreDataset(self.store, tokens, batch_size=batch, shuffle=True, seed=0)
        if len(self.dataset) == 0:
            raise SystemExit(f"{path} holds fewer than {batch} {tokens} tokens: one batch is needed at least.")
        self.device, self.fetch_ms, self._it = device, [], self._stream()

    def _stream(self) -> Iterator[torch.Tensor]:
        epoch = 0
        while True:
            self.dataset.set_epoch(epoch)
            for b in self.dataset:
                yield b.features
            epoch += 1

    def __next__(self) -> torch.Tensor:
        start = time.perf_counter()
        x = next(self._it).to(self.device, non_blocking=True)
        self.fetch_ms.append((time.perf_counter() - start) * 1e3)
        return x


# ------------------------------------------------------------------------------------------------ rows
def adam(params) -> torch.optim.Optimizer:
    """The peers' optimizer: torch's default Adam, as their trainers build it."""
    return torch.optim.Adam(list(params), lr=LR, betas=BETAS, eps=EPS)


def floor_rows(size: Size, device: str) -> list[Row]:
    def weights() -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(1)
        return torch.randn(size.d_sae, size.d, generator=gen).to(device) / math.sqrt(size.d), torch.zeros(
            size.d_sae, device=device)

    def matmul() -> Step:
        w, b = weights()

        def step(x: torch.Tensor) -> None:
            F.linear(x, w, b)

        return step

    def matmul_topk(chunk: int | None) -> Callable[[], Step]:
        def build() -> Step:
            w, b = weights()

            def step(x: torch.Tensor) -> None:
                if chunk is None:
                    F.linear(x, w, b).topk(size.k, dim=1, sorted=False)
                    return
                buf = x.new_empty(min(chunk, len(x)), size.d_sae)  # one buffer for all blocks, as select_linear
                for start in range(0, len(x), chunk):
                    block = x[start : start + chunk]
                    torch.addmm(b, block, w.t(), out=buf[: len(block)]).topk(size.k, dim=1, sorted=False)

            return step

        return build

    return [Row("floor (a): x @ W_enc^T", "floor", "", matmul),
            Row("floor (b): (a) + row top-k, one block", "floor", "", matmul_topk(None)),
            Row("floor (b): (a) + row top-k, 1024-row blocks", "floor", "", matmul_topk(1024))]


def variant_builds(variants: dict[str, type], names: list[str] | None, size: Size, searches: list[str] | None
                   ) -> list[tuple[str, type, dict[str, Any] | None, str]]:
    """``(name, class, kwargs, note)`` per mim row: one per variant, or one per ``searches`` entry for the variants
    whose constructor takes ``candidate_search``."""
    builds = []
    for name, cls in variants.items():
        if names is not None and name not in names:
            continue
        kwargs, note = mim_kwargs(cls, size)
        if kwargs is None or not searches or "candidate_search" not in inspect.signature(cls.__init__).parameters:
            builds.append((name, cls, kwargs, note))
        else:
            builds += [(name, cls, {**kwargs, "candidate_search": search}, note) for search in searches]
    return builds


def mim_kwargs(cls: type, size: Size) -> tuple[dict[str, Any] | None, str]:
    """Constructor arguments beyond (d_model, d_sae), and a note; None when the bench cannot build ``cls``."""
    if cls.__name__ in KNOWN_ARGS:
        return KNOWN_ARGS[cls.__name__](size), ""
    params = [p for name, p in inspect.signature(cls.__init__).parameters.items()
              if name not in ("self", "d_model", "d_sae") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in params if p.default is inspect.Parameter.empty]
    if required:
        return None, f"skipped: constructor needs {', '.join(required)} (unknown to the bench: add it to KNOWN_ARGS)"
    return ({"k": size.k} if any(p.name == "k" for p in params) else {}), "defaults (not in KNOWN_ARGS)"


def mim_rows(size: Size, names: list[str] | None, sample: torch.Tensor, device: str,
             searches: list[str] | None = None) -> list[Row]:
    from mim.sae import VARIANTS
    from mim.sae.variants.base import SupportStep

    rows = []
    for name, cls, kwargs, note in variant_builds(VARIANTS, names, size, searches):
        shown = {k: v for k, v in (kwargs or {}).items() if k not in ("k",)}
        label = f"mim {name}" + (f" ({', '.join(f'{k} {v}' for k, v in shown.items())})" if shown else "")
        if kwargs is None:
            rows.append(Row(label, "mim", FAMILY.get(name, name), lambda: None, note=note))
            continue
        states = [False, True] if issubclass(cls, SupportStep) else [False]
        for sparse in states:
            rows.append(Row(label + (f" (sparse state: l0 ~ {size.k})" if sparse else ""), "mim",
                            FAMILY.get(name, name), mim_build(cls, kwargs, size, sample, device, sparse), note=note))
    return rows


def sparse_state_(sae: Any, sample: torch.Tensor, k: int) -> None:
    """Move a threshold variant (ReLU, JumpReLU) from its initialisation, where about half the latents fire on
    every token (its dense step), to a trained-like sparse code: ``b_enc`` shifted so that each latent fires on
    ``k / d_sae`` of the sample's tokens (its ``1 - k / d_sae`` quantile of ``z`` becomes the cut: 0 for ReLU,
    ``theta = 1`` for JumpReLU), so ``l0 ~ k`` as for TopK."""
    with torch.no_grad():
        z = sae.pre_acts(sae.normalize(sample)).float()
        rank = max(1, min(len(z), round(len(z) * (1 - k / sae.d_sae))))
        cut = z.kthvalue(rank, dim=0).values
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.zero_()
            cut = cut - 1.0
        sae.b_enc.sub_(cut.to(sae.b_enc.dtype))


def mim_build(cls: type, kwargs: dict[str, Any], size: Size, sample: torch.Tensor, device: str, sparse: bool
              ) -> Callable[[], Step]:
    """The builder of one mim row; ``sparse``: at :func:`sparse_state_`, held there by Adam at lr 0 (the same work
    per step; at lr 2e-4 the codes of these few steps drift away from ``l0 ~ k``)."""
    from mim.sae.module import sae_adam

    def build() -> Step:
        sae = cls(size.d, size.d_sae, **kwargs).to(device)
        sae.initialize(sample.to(device))
        if sparse:
            sparse_state_(sae, sample.to(device), size.k)
        sae.train()
        opt = sae_adam(sae.parameters(), 0.0 if sparse else LR, BETAS, EPS)  # SAETraining's (float32: fused)

        def step(x: torch.Tensor) -> None:  # SAETraining.training_step + Lightning's optimizer step
            x_n = sae.normalize(x)
            out = sae.loss(x_n)
            if not bool(torch.isfinite(out.loss.detach())):
                raise FloatingPointError(f"loss {float(out.loss)}")
            sae.update_firing(out.fired, len(x_n))
            sae.dead_latents().float().mean()  # logged by training_step
            opt.zero_grad()
            out.loss.backward()
            sae.remove_parallel_grad_()
            opt.step()
            sae.normalize_decoder_()

        return step

    return build


def clip(params, on: bool) -> None:
    if on:
        torch.nn.utils.clip_grad_norm_(params, 1.0)


def overcomplete_rows(size: Size, points: torch.Tensor, device: str, peer_clip: bool) -> list[Row]:
    try:
        import overcomplete
        from overcomplete import sae as oc
    except Exception as err:  # noqa: BLE001  (ImportError, or a broken install)
        return [Row("overcomplete", "peer", "", lambda: None,
                    note=f"not installed ({type(err).__name__}: {err})"[:150])]
    version = overcomplete.__version__

    def row(label: str, family: str, make: Callable[[], Any], l0: bool = False) -> Row:
        def build() -> Step:
            from overcomplete.sae.trackers import DeadCodeTracker

            model = make()
            model.train()
            opt = adam(model.parameters())
            tracker = DeadCodeTracker(size.d_sae, device)

            def step(x: torch.Tensor) -> None:  # overcomplete.sae.train_sae's loop body
                opt.zero_grad()
                z_pre, z, x_hat = model(x)
                loss = (x - x_hat).square().mean()
                if l0:  # JumpSAE: the L0 penalty through its Heaviside pseudo-gradient
                    step_fn = oc.heaviside(torch.relu(z_pre), torch.exp(model.thresholds), model.kernel_fn,
                                           model.bandwidth)
                    loss = loss + 1e-3 * step_fn.sum(-1).mean()
                tracker.update(z)
                loss.backward()
                clip(model.parameters(), peer_clip)
                opt.step()

            return step

        return Row(f"overcomplete {version} {label}", "peer", family, build)

    d, n, k = size.d, size.d_sae, size.k
    return [
        row("TopKSAE", "TopK", lambda: oc.TopKSAE(d, n, top_k=k, device=device)),
        row(f"BatchTopKSAE (top_k {k}*N)", "BatchTopK",
            lambda: oc.BatchTopKSAE(d, n, top_k=k * size.batch, device=device)),
        row("JumpSAE (rectangle)", "JumpReLU", lambda: oc.JumpSAE(d, n, kernel="rectangle", device=device), l0=True),
        row(f"MpSAE (k {k})", "MP", lambda: oc.MpSAE(d, n, k=k, device=device)),
        row(f"RATopKSAE ({len(points)} points)", "Archetypal",
            lambda: oc.RATopKSAE(d, n, points=points.to(device), top_k=k, device=device)),
    ]


def saelens_rows(size: Size, prefixes: list[int], device: str, peer_clip: bool) -> list[Row]:
    try:
        import sae_lens
        from sae_lens import saes as sl
        from sae_lens.saes.sae import TrainCoefficientConfig, TrainStepInput
    except Exception as err:  # noqa: BLE001
        return [Row("SAELens", "peer", "", lambda: None, note=f"not installed ({type(err).__name__}: {err})"[:150])]
    version = sae_lens.__version__

    def row(label: str, family: str, make: Callable[[], Any]) -> Row:
        def build() -> Step:
            sae = make()
            sae.train()
            opt = adam(sae.parameters())
            coefficients = {name: c.value if isinstance(c, TrainCoefficientConfig) else c
                            for name, c in sae.get_coefficients().items()}
            dead = torch.zeros(size.d_sae, dtype=torch.bool, device=device)
            since_fired = torch.zeros(size.d_sae, device=device)
            act_freq = torch.zeros(size.d_sae, device=device)
            count = [0]

            def step(x: torch.Tensor) -> None:  # sae_lens SAETrainer._train_step without schedulers and logging
                out = sae.training_forward_pass(TrainStepInput(
                    sae_in=x, coefficients=coefficients, dead_neuron_mask=dead, n_training_steps=count[0],
                    is_logging_step=False))
                with torch.no_grad():
                    firing = out.feature_acts.bool().float()
                    did_fire = firing.sum(-2).bool()
                    if did_fire.is_sparse:
                        did_fire = did_fire.to_dense()
                    since_fired.add_(1)
                    since_fired[did_fire] = 0
                    act_freq.add_(firing.sum(0).to_dense() if firing.is_sparse else firing.sum(0))
                out.loss.backward()
                clip(sae.parameters(), peer_clip)
                opt.step()
                opt.zero_grad()
                count[0] += 1

            return step

        return Row(f"SAELens {version} {label}", "peer", family, build)

    common = {"d_in": size.d, "d_sae": size.d_sae, "dtype": "float32", "device": device}
    k = size.k
    return [
        row("TopK", "TopK", lambda: sl.TopKTrainingSAE(sl.TopKTrainingSAEConfig(k=k, **common))),
        row("TopK (use_sparse_activations)", "TopK", lambda: sl.TopKTrainingSAE(
            sl.TopKTrainingSAEConfig(k=k, use_sparse_activations=True, **common))),
        row("BatchTopK", "BatchTopK", lambda: sl.BatchTopKTrainingSAE(sl.BatchTopKTrainingSAEConfig(k=k, **common))),
        row("JumpReLU", "JumpReLU", lambda: sl.JumpReLUTrainingSAE(sl.JumpReLUTrainingSAEConfig(**common))),
        row("MatryoshkaBatchTopK", "Matryoshka", lambda: sl.MatryoshkaBatchTopKTrainingSAE(
            sl.MatryoshkaBatchTopKTrainingSAEConfig(k=k, matryoshka_widths=list(prefixes), **common))),
        row("Standard (ReLU + L1)", "ReLU-L1", lambda: sl.StandardTrainingSAE(sl.StandardTrainingSAEConfig(**common))),
        row(f"MatchingPursuit ({k} iterations)", "MP", lambda: sl.MatchingPursuitTrainingSAE(
            sl.MatchingPursuitTrainingSAEConfig(max_iterations=k, residual_threshold=0.0,
                                                stop_on_duplicate_support=False, **common))),
        row("AbsTopK", "AbsTopK", lambda: sl.AbsTopKTrainingSAE(sl.AbsTopKTrainingSAEConfig(k=k, **common))),
    ]


# ------------------------------------------------------------------------------------------------ timing
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def short(err: BaseException) -> str:
    return f"failed: {type(err).__name__}: {err}".replace("|", "/").replace("\n", " ")[:160]


def run_steps(step: Step, batches: Batches, args: argparse.Namespace, n: int) -> float:
    """Seconds per step of ``n`` steps, each on the next batch (fetched outside the timed part)."""
    total = 0.0
    for _ in range(n):
        x = next(batches)
        sync(args.device)
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
            step(x)
        sync(args.device)
        total += time.perf_counter() - start
    return total / n


def time_group(rows: list[Row], batches: Batches, args: argparse.Namespace) -> None:
    """Build the rows, warm them up (dropping failing or too slow ones), then time them round-robin."""
    live = []
    for row in rows:
        if row.note.startswith(("skipped", "not installed")):
            continue
        try:
            row.step = row.build()
            for _ in range(args.warmup):
                took = run_steps(row.step, batches, args, 1)
                if took > args.max_step_s:  # reported with that one step, marked as such
                    row.note, row.step, row.times = "one warm-up step only (> --max-step-s)", None, [took]
                    break
            if row.step is not None:
                live.append(row)
        except Exception as err:  # noqa: BLE001  (a row that cannot run reports why; the bench goes on)
            row.note, row.step = short(err), None
        print(f"  built {row.name}{': ' + row.note if row.note else ''}", flush=True)
    for rep in range(args.repeats):
        for i in range(len(live)):
            row = live[(i + rep) % len(live)]
            if row.step is None:
                continue
            try:
                row.times.append(run_steps(row.step, batches, args, args.steps))
            except Exception as err:  # noqa: BLE001
                row.note, row.step, row.times = short(err), None, []
        print(f"  repeat {rep + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)
    if args.profile:
        for row in live:
            if row.step is not None and row.kind == "mim":
                profile_row(row, batches, args)
    for row in rows:
        row.step = None
    gc.collect()


def profile_row(row: Row, batches: Batches, args: argparse.Namespace, top: int = 12) -> None:
    """Print the ``top`` operators of ``args.profile`` steps of ``row`` by self time (ms per step, share)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    xs = [next(batches) for _ in range(args.profile)]
    with profile(activities=activities) as prof:
        for x in xs:
            with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16):
                row.step(x)
        sync(args.device)
    attr = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    print(f"\n  profile of {row.name}, {args.profile} steps: {total / 1e3 / args.profile:.1f} ms of self time per step\n")
    print("  | operator | calls per step | ms per step | share |\n  |---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -getattr(e, attr))[:top]:
        t = getattr(e, attr)
        print(f"  | `{e.key}` | {e.count / args.profile:g} | {t / 1e3 / args.profile:.1f} | {t / total:.0%} |")
    print(flush=True)


def row_bytes(size: Size, row: Row) -> int:
    """Rough bytes of a row's parameters, gradients and Adam moments (4 copies of the weights)."""
    return 0 if row.kind == "floor" else 4 * 4 * (2 * size.d_sae * size.d + size.d_sae + size.d)


def groups_of(rows: list[Row], size: Size, args: argparse.Namespace) -> list[list[Row]]:
    floors = [r for r in rows if r.kind == "floor"]
    others = [r for r in rows if r.kind != "floor"]
    if sum(row_bytes(size, r) for r in rows) <= args.max_mem_gb * 2**30:
        return [rows]
    families: dict[str, list[Row]] = {}
    for r in others:
        families.setdefault(r.family or r.name, []).append(r)
    groups: list[list[Row]] = []
    budget = args.max_mem_gb * 2**30
    for fam in families.values():  # whole families, packed greedily into groups within the memory budget
        if groups and sum(row_bytes(size, r) for r in groups[-1] + fam) <= budget:
            groups[-1] += fam
        else:
            groups.append(list(fam))
    print(f"rows timed in {len(groups)} groups of whole families (all rows: > --max-mem-gb {args.max_mem_gb}); "
          "the floors are timed in each group and each group's ratios use its own floors", flush=True)
    return [[*floor_rows_copy(floors), *g] for g in groups]


def floor_rows_copy(floors: list[Row]) -> list[Row]:
    """Fresh floor rows (their own times) with the same builders, for another group."""
    return [Row(r.name, r.kind, r.family, r.build) for r in floors]


# ------------------------------------------------------------------------------------------------ report
def fmt_ratio(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def report(size: Size, groups: list[list[Row]], batches: Batches, args: argparse.Namespace,
           source: str) -> dict[str, Any]:
    print(f"\n### {size.name}: d {size.d}, d_sae {size.d_sae}, k {size.k}, batch {size.batch} tokens\n")
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else
             f" ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch threads "
             f"{torch.get_num_threads()}")
          + (", bf16 autocast" if args.bf16 else ", float32") + f"; {source}; batch fetch through FeatureStoreDataset: median "
          f"{statistics.median(batches.fetch_ms):.1f} ms (not in the step); median of {args.repeats} samples of "
          f"{args.steps} step(s) per row "
          f"after {args.warmup} warm-up step(s); load average now {os.getloadavg()[0]:.1f}; peers "
          + ("clip gradients at norm 1" if args.peer_clip else "without gradient clipping") + ".\n")
    print("| row | step ms | tokens/s | x (a) | x (b) | x mim TopK | mim / best peer |")
    print("|---|---:|---:|---:|---:|---:|---|")
    results = []
    for number, group in enumerate(groups, 1):
        if len(groups) > 1:
            print(f"| *group {number} of {len(groups)}* | | | | | | |")
        floor_a = next((r.ms for r in group if r.name.startswith("floor (a)") and r.ms), None)
        bs = [r.ms for r in group if r.name.startswith("floor (b)") and r.ms]
        floor_b = min(bs) if bs else None
        topk = next((r.ms for rs in groups for r in rs if r.name == "mim TopKSAE" and r.ms), None)
        for row in group:
            if row.ms is None:
                print(f"| {row.name} | {row.note or 'no time'} | - | - | - | - | - |")
                results.append({"size": size.name, "row": row.name, "note": row.note})
                continue
            peer = ""
            if row.kind == "mim":
                peers = [r for r in group if r.kind == "peer" and r.family == row.family and r.ms]
                if peers:
                    best = min(peers, key=lambda r: r.ms)
                    peer = f"{best.ms / row.ms:.2f}x ({best.name.split(' ', 2)[0]} {best.name.split(' ', 2)[2]})"
            vs_topk = row.ms / topk if topk and row.kind != "floor" else None
            mark = f" ({row.note})" if row.note else ""
            print(f"| {row.name} | {row.ms:,.1f}{mark} | {size.batch / row.ms * 1e3:,.0f} | "
                  f"{fmt_ratio(row.ms / floor_a if floor_a else None)} | "
                  f"{fmt_ratio(row.ms / floor_b if floor_b else None)} | {fmt_ratio(vs_topk)} | {peer or '-'} |")
            results.append({"size": size.name, "row": row.name, "kind": row.kind, "family": row.family,
                            "ms": row.ms, "times_ms": [t * 1e3 for t in row.times], "note": row.note})
    print()
    return {"size": size.name, "rows": results}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    names = None if args.variants == "all" else [n.strip() for n in args.variants.split(",") if n.strip()]
    sizes = [args.custom] if args.custom else [SIZES["tiny"], SIZES["vitb"]] if args.size == "all" else [
        SIZES[args.size]]
    print(f"bench_sae {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    out = []
    for size in sizes:
        if args.store:
            path, source = Path(args.store), f"feature store {args.store}"
        else:
            path = synthetic_store(size, Path(args.store_dir), args.store_batches)
            source = (f"synthetic anisotropic Gaussian patch tokens (float32), feature store {path} of "
                      f"{args.store_batches} batches")
        batches = Batches(path, size.batch, args.device)
        if batches.store.d_model != size.d:
            size = Size(size.name + f" (d {batches.store.d_model} of the store)", batches.store.d_model,
                        size.d_sae, size.k, size.batch, size.grid)
        init = min(args.init_tokens, len(batches.dataset) * size.batch)
        sample = torch.cat([next(batches) for _ in range(-(-init // size.batch))])[:init]
        batches.fetch_ms.clear()
        print(f"{size.name}: store {path}, {len(batches.dataset)} batches per epoch", flush=True)
        searches = args.candidate_search.split(",") if args.candidate_search else None
        rows = floor_rows(size, args.device) + mim_rows(size, names, sample, args.device, searches)
        if not args.no_peers:
            points = sample[torch.randperm(len(sample), generator=torch.Generator().manual_seed(2))]
            points = points[: n_candidates(size)]
            prefixes = sorted({max(size.d_sae // 2**i, 1) for i in range(4, -1, -1)})  # MatryoshkaSAE's default
            rows += overcomplete_rows(size, points, args.device, args.peer_clip)
            rows += saelens_rows(size, prefixes, args.device, args.peer_clip)
        if names is not None:  # peers only for the chosen variants' families
            families = {FAMILY.get(n, n) for n in names}
            rows = [r for r in rows if r.kind != "peer" or r.family in families or not r.family]
        groups = groups_of(rows, size, args)
        for group in groups:
            time_group(group, batches, args)
        out.append(report(size, groups, batches, args, source))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
