"""The one training loop of every SAE variant, as a LightningModule (``mim fit|validate`` on a feature store)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch

from mim.errors import ConfigError, UserError
from mim.features.store import MULTI_TOKEN_KINDS, FeatureBatch, FeatureStore
from mim.sae.data import FeatureStoreDataModule, check_d_model
from mim.sae.downstream import downstream_probe
from mim.sae.metrics import decoder_cosine_stats, sae_metrics
from mim.sae.variants import SparseAutoencoder


def sae_adam(params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float], eps: float,
             fused: bool = True) -> torch.optim.Adam:
    """The SAE optimizer: ``torch.optim.Adam``, in its fused implementation where every parameter allows it
    (floating point, on CPU or CUDA).

    The fused kernel is the same update in one pass per tensor instead of about ten element-wise passes; on 2 CPU
    cores it takes 0.33 ms instead of 4.3 ms for a ViT-Tiny-size TopK SAE (1.2 M parameters) and 5.4 instead of
    40 ms for the archetypal SAE's 9.4 M mixing weights. ``fused=False`` keeps torch's default (foreach)
    implementation: ``SAETraining`` passes it under 16-bit precision, whose gradient scaler would otherwise
    leave the unscaling to the fused kernel, which Lightning's gradient clipping does not allow.

    Args:
        params: the SAE's parameters.
        lr, betas, eps: Adam's.
        fused: use the fused implementation where possible.
    """
    params = list(params)
    fused = fused and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused or None)


class SAETraining(L.LightningModule):
    """Train a :class:`~mim.sae.variants.SparseAutoencoder` on feature-store batches (``FeatureStoreDataModule``).

    Recipe (shared by all variants; Gao et al. 2024, arXiv 2406.04093, Sec. 2 and App. A; Conerly et al. 2024,
    "April update"; dictionary_learning's trainers):

    - Initialisation on ``init_tokens`` shuffled training tokens (the same on every rank): input scale
      (``E||x_n|| = sqrt(d_model)``) and ``b_dec`` = their geometric median; the decoder starts as random unit
      directions, the encoder as its transpose. Skipped when resuming (the SAE's ``initialized`` buffer).
    - Adam (``betas``, ``eps`` = 6.25e-10 as Gao et al.; fused, :func:`sae_adam`), lr linearly warmed up over
      ``warmup_steps``, constant, then linearly decayed to 0 over the last ``decay_fraction`` of the steps (April
      update: last 20 %).
    - Unit-norm decoder rows for the variants that use it: the gradient's parallel component is removed before
      each optimizer step (``on_before_optimizer_step``, which Lightning runs after the backward and *before* its
      gradient clipping, so ``--trainer.gradient_clip_val`` measures and clips the gradient that is applied) and
      the rows are re-normalised after it (:meth:`optimizer_step`), so they stay unit-norm with any clipping.
    - Dead latents tracked by training tokens since each latent last fired (summed over DDP ranks).
    - No host-device synchronisation in the training step: firing counts and dead-latent counters stay on the
      device, and a non-finite loss is recorded there (its first step and value) and raised as a
      :class:`~mim.errors.UserError` at the next check: every ``log_every_n_steps`` steps (when Lightning syncs
      to log anyway), at the end of each epoch and before any checkpoint is saved (so none holds the NaN model).
    - Validation: :func:`mim.sae.metrics.sae_metrics` in the store's units (FVU in float64, explained variance,
      L0, dead / dense / 1 % latents, cosine similarity, relative reconstruction bias, L2 ratio), the decoder
      coherence and mean max decoder cosine and, with ``downstream``, the linear-probe accuracy retained and
      k-sparse probing (:func:`mim.sae.downstream.downstream_probe`).

    Args:
        sae: the variant (``class_path: mim.sae.TopKSAE`` + ``init_args`` in a config).
        lr: peak learning rate.
        betas, eps: Adam's.
        warmup_steps: linear warm-up steps.
        decay_fraction: fraction of the total steps over which the lr decays linearly to 0 at the end.
        init_tokens: tokens of the initialisation sample.
        dense_threshold: firing frequency above which a latent counts as dense in validation.
        downstream: also run :func:`mim.sae.downstream.downstream_probe` at the end of each validation
            (linear-probe top-1 on codes vs raw features vs reconstructions, and k-sparse probing of the codes vs
            the raw dimensions, logged as ``val/sparse_probe_top{k}`` / ``val/sparse_probe_raw_top{k}``; fits on
            the training store, scores on the validation store).

    Mixed precision: ``--trainer.precision bf16-mixed`` (or ``16-mixed`` on a GPU) runs the training and
    validation steps under autocast; the SAE keeps float32 parameters, buffers, thresholds and losses (see
    :class:`~mim.sae.variants.SparseAutoencoder`), the validation metrics accumulate in float64.

    Raises:
        ConfigError (at construction): ``lr <= 0``, ``betas`` outside ``[0, 1)``, ``eps <= 0``,
            ``warmup_steps < 0``, ``decay_fraction`` outside ``[0, 1]``, ``init_tokens < 1`` or
            ``dense_threshold`` outside ``(0, 1]``.
        UserError: a NaN / Inf loss (names the first step where it happened; raised at the next check, see
            above); from ``setup``, a store whose ``d_model`` differs from the SAE's (``FeatureStoreError``).
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 6.25e-10,
        warmup_steps: int = 1000,
        decay_fraction: float = 0.2,
        init_tokens: int = 65536,
        dense_threshold: float = 0.1,
        downstream: bool = False,
    ) -> None:
        super().__init__()
        betas = tuple(betas)
        checks = (
            ("lr", lr, lr > 0, "be > 0", "e.g. 2e-4 * sqrt(16384 / d_sae) (Gao et al.)"),
            ("betas", list(betas), len(betas) == 2 and all(0 <= b < 1 for b in betas), "be two numbers in [0, 1)",
             "e.g. [0.9, 0.999]"),
            ("eps", eps, eps > 0, "be > 0", "e.g. 6.25e-10 (Gao et al.)"),
            ("warmup_steps", warmup_steps, warmup_steps >= 0, "be >= 0", "e.g. 1000 (0: no warm-up)"),
            ("decay_fraction", decay_fraction, 0 <= decay_fraction <= 1, "lie in [0, 1]",
             "e.g. 0.2 (the last 20 % of the steps; 0: no decay)"),
            ("init_tokens", init_tokens, init_tokens >= 1, "be >= 1", "e.g. 65536"),
            ("dense_threshold", dense_threshold, 0 < dense_threshold <= 1, "lie in (0, 1]", "e.g. 0.1"),
        )
        for name, value, ok, rule, fix in checks:
            if not ok:
                raise ConfigError(
                    f"SAETraining {name} must {rule}, got {value!r}. Fix: set --model.init_args.{name}, {fix}."
                )
        self.save_hyperparameters(ignore=["sae"])
        self.sae = sae
        self.val_metrics = sae_metrics(sae.d_model, sae.d_sae, dense_threshold=dense_threshold, prefix="val/")
        # first non-finite training loss: its global step (-1: none yet) and value, kept on the device
        self._nonfinite_step: torch.Tensor | None = None
        self._nonfinite_loss: torch.Tensor | None = None
        self._loss_terms: tuple[str, ...] = ()

    # ----------------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if isinstance(datamodule, FeatureStoreDataModule):
            check_d_model(datamodule.train_metadata, self.sae.d_model)

    def on_fit_start(self) -> None:
        if bool(self.sae.initialized):
            return
        dm = self.trainer.datamodule
        if not isinstance(dm, FeatureStoreDataModule):
            raise ConfigError(
                "SAETraining initialises the SAE from a feature store. Fix: train with "
                "--data mim.sae.data.FeatureStoreDataModule (or call sae.initialize(sample) before fitting)."
            )
        batches = FeatureStore(dm.train_store).batches(
            self.hparams.init_tokens, tokens=dm.tokens, seed=dm.seed, flatten=dm.tokens in MULTI_TOKEN_KINDS,
            skip_high_norm=dm.skip_high_norm, dtype=torch.float32,
        )
        self.sae.initialize(next(iter(batches)).features.to(self.device))

    def configure_optimizers(self) -> dict[str, Any]:
        scaler = str(self.trainer.precision).startswith("16")  # fp16 with a GradScaler (see sae_adam)
        optimizer = sae_adam(self.sae.parameters(), self.hparams.lr, self.hparams.betas, self.hparams.eps,
                             fused=not scaler)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, decay = self.hparams.warmup_steps, int(self.hparams.decay_fraction * total)

        def factor(step: int) -> float:
            ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
            tail = min(1.0, (total - step) / decay) if decay > 0 else 1.0
            return max(0.0, min(ramp, tail))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # --------------------------------------------------------------------------------------- training
    def training_step(self, batch: FeatureBatch, batch_idx: int) -> torch.Tensor:
        x_n = self.sae.normalize(batch.features)
        out = self.sae.loss(x_n)
        finite = torch.isfinite(out.loss.detach())
        if self.trainer.world_size > 1:  # every rank records the same step: all stop at the same check
            finite = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        self._record_nonfinite(finite, out.loss.detach(), tuple(out.terms))
        if (self.global_step + 1) % max(int(self.trainer.log_every_n_steps), 1) == 0:
            self.check_finite()  # a logging step: Lightning synchronises for the logger anyway
        fired, tokens = out.fired, len(x_n)
        if self.trainer.world_size > 1:
            fired = self.trainer.strategy.reduce(fired, reduce_op="sum")
            tokens *= self.trainer.world_size
        self.sae.update_firing(fired, tokens)
        logs = {"train/loss": out.loss, "train/l0": out.l0,
                "train/dead_latents": self.sae.dead_latents().float().mean()}
        logs.update({f"train/{name}": value for name, value in out.terms.items()})
        self.log_dict(logs, batch_size=len(x_n))
        return out.loss

    def _record_nonfinite(self, finite: torch.Tensor, loss: torch.Tensor, terms: tuple[str, ...]) -> None:
        """Remember (on the device, no synchronisation) the first step whose loss was not finite."""
        if self._nonfinite_step is None or self._nonfinite_step.device != loss.device:
            self._nonfinite_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self._nonfinite_loss = torch.zeros((), dtype=torch.float32, device=loss.device)
        first = ~finite & (self._nonfinite_step < 0)
        self._nonfinite_step = torch.where(first, self.global_step, self._nonfinite_step)
        self._nonfinite_loss = torch.where(first, loss.float(), self._nonfinite_loss)
        self._loss_terms = terms

    def check_finite(self) -> None:
        """Raise if a training loss since the start was NaN / Inf (one host-device synchronisation).

        Raises:
            UserError: names the first step with a non-finite loss and the loss terms.
        """
        if self._nonfinite_step is None:
            return
        step = int(self._nonfinite_step)
        if step < 0:
            return
        loss = float(self._nonfinite_loss)
        self._nonfinite_step = None  # raise once (a checkpoint-on-exception callback may save after this)
        raise UserError(
            f"The SAE loss is not finite at step {step} (here {loss}; terms {', '.join(self._loss_terms)}; under "
            f"DDP on at least one rank; found at step {self.global_step}: the loss is checked every "
            "log_every_n_steps steps, at each epoch end and before each checkpoint). "
            "Fix: lower --model.init_args.lr (or the sparsity coefficient), and check the feature store "
            "(the data module's check_finite=true names a NaN shard and row)."
        )

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite()  # never save the weights of a diverged run as if they were good

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the decoder gradient's component parallel to each row. Lightning calls this after the
        backward (and the unscaling of a 16-mixed GradScaler) and before ``gradient_clip_val`` clips, so the
        clipped norm is that of the gradient the optimizer applies (``Precision._after_closure``)."""
        self.sae.remove_parallel_grad_()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the decoder rows back to unit norm: inside the step, before any
        ``on_train_batch_end`` hook, so a step checkpoint (``ModelCheckpoint`` saves in that hook) holds the
        normalised decoder and a resumed run goes on exactly."""
        super().optimizer_step(*args, **kwargs)
        self.sae.normalize_decoder_()

    # ------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: FeatureBatch, batch_idx: int) -> None:
        x = batch.features
        out = self.sae(x)
        self.val_metrics.update(x=x, x_hat=out.x_hat, code=out.code)

    def on_validation_epoch_end(self) -> None:
        values = {name: value.float() for name, value in self.val_metrics.compute().items()}
        self.val_metrics.reset()
        values.update({f"val/{name}": value.float() for name, value in decoder_cosine_stats(self.sae.W_dec).items()})
        if self.hparams.downstream and not self.trainer.sanity_checking:
            datamodule = self.trainer.datamodule
            probe = downstream_probe(self.sae, datamodule.train_store, datamodule.val_store, tokens=datamodule.tokens)
            values.update({f"val/{name}": torch.tensor(float(value)) for name, value in probe.items()})
        self.log("val/fvu", values.pop("val/fvu"), prog_bar=True)  # values are global: torchmetrics synced them
        self.log_dict(values)
