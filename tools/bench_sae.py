"""Training-step speed of mim's TopK SAE against the dense-encoder roofline and overcomplete's ``TopKSAE``.

Rows (one batch of ``--batch`` tokens, all in one process, timed round-robin so that load drifts hit every row):

1. roofline: the unavoidable dense encoder matmul alone, ``z = F.linear(x, W_enc, b_enc)`` and
   ``z.backward(g)`` with a fixed dense ``g`` (weights require grad, ``x`` does not).
2. mim TopKSAE: ``normalize``, ``loss`` (sparse kernels of :mod:`mim.sae.kernels`), backward,
   ``remove_parallel_grad_``, Adam, ``normalize_decoder_``, ``update_firing``.
3. the same step with a dense decoder (plain autograd: pre-activations, topk, scatter into a dense
   (N, d_sae) code, dense matmul decode): what the sparse kernels buy. Before timing, its loss and
   gradients are checked equal to mim's on one batch.
4. overcomplete 0.3.0 ``TopKSAE(input_shape=d, nb_concepts=d_sae, top_k=k)``: its ``train_sae`` loop body
   (forward, MSE criterion called with ``get_dictionary()``, dead-code tracker, backward, Adam) without
   gradient clipping (mim's step does not clip either).

The step time of a row is the median over ``--repeats`` timed runs of ``--steps`` steps each, after
``--warmup`` untimed steps. Inputs are real flattened patch tokens with ``--store``, else Gaussian.

Environment (overcomplete is installed only here, never in the project's own .venv)::

    python3 -m venv /work/bench-venv && . /work/bench-venv/bin/activate
    pip install torch==2.14.1 torchvision==0.29.1          # from the local index, as in the .venv
    pip install -c constraints.txt -e .                      # mim itself
    pip install -c constraints.txt overcomplete "matplotlib<3.9"

    python tools/bench_sae.py                                # CPU, 2 threads, Gaussian inputs
    python tools/bench_sae.py --store PATH/TO/STORE          # real patch tokens of a feature store
    python tools/bench_sae.py --device cuda --bf16           # GPU, bf16 autocast
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mim.sae.variants import TopKSAE
from mim.sae.variants.base import batch_variance

Step = Callable[[], None]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=192, help="d_model (the store's when --store is given)")
    p.add_argument("--d-sae", type=int, default=3072)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=4096, help="tokens per step")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--steps", type=int, default=3, help="steps per timed run")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (cuda)")
    p.add_argument("--store", default=None, help="feature store folder: real patch tokens instead of Gaussian")
    p.add_argument("--lr", type=float, default=1e-4)
    return p.parse_args(argv)


def load_batch(args: argparse.Namespace) -> torch.Tensor:
    """(batch, d) float32 inputs: the store's first shuffled flattened patch-token batch, else N(0, 1)."""
    if args.store is None:
        return torch.randn(args.batch, args.d, generator=torch.Generator().manual_seed(0))
    from mim.features.store import FeatureStore

    store = FeatureStore(args.store)
    args.d = store.d_model
    x = next(iter(store.batches(args.batch, flatten=True))).features.float()
    return x.repeat(-(-args.batch // len(x)), 1)[: args.batch]  # tile a store smaller than one batch


def make_adam(params, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """Adam with the fastest flavour that runs here: fused (CPU and CUDA since torch 2.4), else foreach."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True), "fused"
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True), "foreach"


def dense_loss(sae: TopKSAE, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mim's TopK loss (no dead latents, so no AuxK) with plain autograd and a dense decoder: (loss, fired)."""
    z = sae.pre_acts(x_n)
    top = z.topk(sae.k, dim=1, sorted=False)
    f = torch.zeros_like(z).scatter(1, top.indices, F.relu(top.values))
    x_hat = f @ sae.W_dec + sae.b_dec
    return (x_hat - x_n).pow(2).sum(-1).mean() / batch_variance(x_n), (f > 0).sum(0)


def mim_loss(sae: TopKSAE, x_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = sae.loss(x_n)
    return out.loss, out.fired


def sae_step(sae: TopKSAE, x: torch.Tensor, loss_fn, autocast, lr: float) -> tuple[Step, str]:
    """A closure doing one full training step of ``sae`` on ``x`` with ``loss_fn`` (mim or dense ablation)."""
    opt, flavour = make_adam(sae.parameters(), lr)

    def step() -> None:
        with autocast():
            loss, fired = loss_fn(sae, sae.normalize(x))
        opt.zero_grad()
        loss.backward()
        sae.remove_parallel_grad_()
        opt.step()
        sae.normalize_decoder_()
        sae.update_firing(fired, len(x))

    return step, flavour


def roofline_step(sae: TopKSAE, x: torch.Tensor, autocast) -> Step:
    W_enc = sae.W_enc.detach().clone().requires_grad_()
    b_enc = sae.b_enc.detach().clone().requires_grad_()
    g = torch.randn(len(x), sae.d_sae, device=x.device, generator=torch.Generator(x.device).manual_seed(1))
    x = sae.normalize(x).detach()

    def step() -> None:
        W_enc.grad = b_enc.grad = None
        with autocast():
            z = F.linear(x, W_enc, b_enc)
        z.backward(g.to(z.dtype))

    return step


def overcomplete_step(args: argparse.Namespace, x: torch.Tensor, autocast) -> Step:
    """overcomplete's ``train_sae`` loop body (clip_grad=0, monitoring=0) for its TopKSAE."""
    from overcomplete.sae import TopKSAE as OCTopKSAE
    from overcomplete.sae.trackers import DeadCodeTracker

    model = OCTopKSAE(input_shape=args.d, nb_concepts=args.d_sae, top_k=args.k, device=args.device)
    model.train()
    opt, _ = make_adam(model.parameters(), args.lr)
    tracker = DeadCodeTracker(args.d_sae, args.device)

    def criterion(x, x_hat, pre_codes, codes, dictionary):
        return (x - x_hat).square().mean()

    def step() -> None:
        opt.zero_grad()
        with autocast():
            z_pre, z, x_hat = model(x)
            loss = criterion(x, x_hat, z_pre, z, model.get_dictionary())
        tracker.update(z)
        loss.backward()
        opt.step()

    return step


def check_sparse_equals_dense(sae: TopKSAE, x: torch.Tensor) -> None:
    """Assert mim's sparse-kernel loss and gradients equal the dense-autograd ablation's on ``x``."""
    dense = copy.deepcopy(sae)
    assert not sae.dead_latents().any(), "the check covers the loss without AuxK"
    results = []
    for model, fn in ((sae, mim_loss), (dense, dense_loss)):
        model.zero_grad()
        loss, _ = fn(model, model.normalize(x))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad()
    (loss_s, grads_s), (loss_d, grads_d) = results
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-5, atol=1e-6)
    for name, grad in grads_s.items():
        scale = float(grads_d[name].abs().max())
        torch.testing.assert_close(grad, grads_d[name], rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")
    print(f"checked: sparse == dense (loss {float(loss_s):.6f}; grads of {', '.join(grads_s)})")


def time_rows(steps: dict[str, Step], args: argparse.Namespace) -> dict[str, float]:
    """Median ms per step of each row; rows are timed round-robin, ``--steps`` steps per timed run."""
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync()
            times[name].append((time.perf_counter() - start) / args.steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = load_batch(args).to(args.device)
    autocast = (lambda: torch.autocast(args.device, dtype=torch.bfloat16)) if args.bf16 else contextlib.nullcontext

    def new_sae() -> TopKSAE:
        sae = TopKSAE(args.d, args.d_sae, k=args.k).to(args.device)
        sae.initialize(x)
        return sae

    check_sparse_equals_dense(new_sae(), x)
    mim, flavour = sae_step(new_sae(), x, mim_loss, autocast, args.lr)
    dense, _ = sae_step(new_sae(), x, dense_loss, autocast, args.lr)
    steps = {"roofline: dense encoder matmul fwd+bwd": roofline_step(new_sae(), x, autocast),
             "mim TopKSAE (sparse kernels)": mim, "mim TopKSAE, dense-decoder ablation": dense}
    failed: dict[str, str] = {}
    try:
        import overcomplete

        steps[f"overcomplete {overcomplete.__version__} TopKSAE"] = overcomplete_step(args, x, autocast)
    except ImportError as err:
        failed["overcomplete TopKSAE"] = (f"not importable ({err}); install it in a separate environment: "
                                          'pip install overcomplete "matplotlib<3.9"')
    for name, step in list(steps.items()):  # a row that cannot run reports why instead of stopping the bench
        try:
            step()
        except Exception as err:  # noqa: BLE001
            failed[name] = f"failed: {type(err).__name__}: {err}".replace("|", "/")[:160]
            del steps[name]
    ms = time_rows(steps, args)

    source = f"feature store {args.store}" if args.store else "Gaussian N(0, 1)"
    print(f"torch {torch.__version__}, device {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", threads {torch.get_num_threads()}")
          + f", bf16 autocast {args.bf16}, d={args.d}, d_sae={args.d_sae}, k={args.k}, batch={args.batch} tokens, "
          f"inputs {source}; median of {args.repeats} runs x {args.steps} steps after {args.warmup} warm-up steps")
    print(f"\nAdam: torch.optim.Adam({flavour}=True) for every row; overcomplete without gradient clipping.\n")
    print("| implementation | step ms (median) | tokens/s | x roofline | vs overcomplete |")
    print("|---|---:|---:|---:|---:|")
    roof = ms.get("roofline: dense encoder matmul fwd+bwd")
    oc = next((v for n, v in ms.items() if n.startswith("overcomplete")), None)
    for name, t in ms.items():
        ratio = f"{t / roof:.2f}" if roof else "-"
        speedup = f"{oc / t:.2f}x" if oc and not name.startswith("roof") else "-"
        print(f"| {name} | {t:.2f} | {args.batch / t * 1e3:,.0f} | {ratio} | {speedup} |")
    for name, why in failed.items():
        print(f"| {name} | {why} | - | - | - |")


if __name__ == "__main__":
    main()
