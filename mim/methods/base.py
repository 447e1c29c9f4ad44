"""What every pretraining method shares: AdamW parameter groups, the warmup + cosine schedule,
the MAE learning-rate scaling rule, a finite-loss check and the description of the encoder to export.

Nothing else lives here: each method writes its own forward and loss in its own module.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import numpy as np
import torch

from mim.backbones.vit import create_vit
from mim.errors import ConfigError, UserError
from mim.optim import scaled_lr, warmup_cosine_scheduler, weight_decay_groups

#: Fine-tuning's no-weight-decay list besides biases and 1-D (norm) parameters (timm patterns; MAE's
#: ``main_finetune.py`` passes the ViT's ``no_weight_decay()``).
NO_WEIGHT_DECAY = ("*pos_embed", "*cls_token", "*reg_token", "*dist_token", "*mask_token")
#: Name substrings kept out of weight decay in pretraining when ``decay_tokens=False`` (the opt-out; the
#: official MAE and CAE pretraining decay cls and mask tokens).
TOKEN_KEYS = ("pos_embed", "cls_token", "reg_token", "dist_token", "mask_token")


class NonFiniteLossError(UserError, FloatingPointError):
    """A training loss became NaN or inf (raised by :meth:`PretrainModule.check_finite`); the CLI prints
    it as one ``mim: error:`` line."""


class PretrainModule(L.LightningModule):
    """Base LightningModule of the pretraining methods (optimiser, schedule, export description).

    Args:
        blr: base learning rate; the used rate is ``lr = blr * effective_batch / 256`` (MAE Appendix
            A.1, "linear lr scaling rule"), ``effective_batch = batch_size * accumulate * world_size``.
        lr: absolute learning rate; overrides ``blr`` when given.
        weight_decay: AdamW weight decay (MAE: 0.05), not applied to biases and 1-D parameters (norms,
            layer scale); see ``decay_tokens`` for the tokens.
        betas: AdamW betas (MAE: (0.9, 0.95)).
        warmup_epochs: linear warmup length in epochs (fractions allowed), converted to steps.
        min_lr: final learning rate of the cosine decay.
        decay_tokens: apply weight decay to the cls / register / mask tokens (and a learnable position
            embedding), as the official MAE (``main_pretrain.py``: ``add_weight_decay`` without a skip
            list, only 1-D parameters and biases excluded) and CAE (``run_pretraining.py``: the
            top-level model has no ``no_weight_decay()``) pretraining do. ``False`` keeps every
            parameter whose name contains one of :data:`TOKEN_KEYS` out of weight decay.

    Subclasses set ``self.encoder`` (a plain timm model) and ``self.encoder_config``
    (``{"model_name": str, "model_kwargs": dict}``) so the encoder can be exported and re-created;
    the ViT methods do it with :meth:`init_vit_encoder`, and draw masks with :meth:`sample_mask`.
    """

    encoder: torch.nn.Module
    encoder_config: dict[str, Any]
    mask_generator: Any
    grid_hw: tuple[int, int]

    def __init__(
        self,
        blr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        min_lr: float = 0.0,
        decay_tokens: bool = True,
    ) -> None:
        super().__init__()
        if (lr is None and blr < 0) or (lr is not None and lr < 0):
            raise ConfigError(f"learning rate must be >= 0, got blr={blr}, lr={lr}.")
        if warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        if weight_decay < 0 or min_lr < 0:
            raise ConfigError(
                f"weight_decay and min_lr must be >= 0, got {weight_decay}, {min_lr}. "
                "Fix: set --model.init_args.weight_decay / min_lr to 0 or more."
            )
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ConfigError(f"betas must be two values in [0, 1), got {betas}. Fix: e.g. --model.init_args.betas [0.9,0.95].")
        self.blr, self.lr, self.weight_decay = blr, lr, weight_decay
        self.betas, self.warmup_epochs, self.min_lr = tuple(betas), warmup_epochs, min_lr
        self.decay_tokens = bool(decay_tokens)

    def init_vit_encoder(
        self, backbone: str, img_size: int, patch_size: int, backbone_kwargs: dict[str, Any] | None
    ) -> None:
        """Build the timm ViT encoder (:func:`mim.backbones.vit.create_vit`) and set ``encoder``,
        ``encoder_config`` (what re-creates it with timm) and ``grid_hw`` (the patch grid)."""
        backbone_kwargs = dict(backbone_kwargs or {})
        self.encoder = create_vit(backbone, img_size, patch_size, **backbone_kwargs)
        self.encoder_config = {
            "model_name": backbone,
            "model_kwargs": {"img_size": img_size, "patch_size": patch_size, "num_classes": 0, **backbone_kwargs},
        }
        self.grid_hw = tuple(self.encoder.patch_embed.grid_size)

    def sample_mask(
        self, batch_size: int, generator: torch.Generator | None = None, grid_hw: tuple[int, int] | None = None
    ) -> torch.Tensor:
        """``(B, L)`` bool mask (``True`` = masked) from ``mask_generator``, on this module's device.

        Without ``generator`` in a training step, the masks of the whole global batch (``B x world_size``)
        are drawn from :attr:`step_generator` and this rank keeps its slice: the masks of a step depend only
        on the seed, the epoch and the batch index, never on the number of ranks (or on a resumed run's
        history). Elsewhere (and with a ``generator``) ``B`` masks are drawn from ``generator``.
        """
        grid_hw = grid_hw or self.grid_hw
        return self.per_rank(lambda n, g: self.mask_generator(n, grid_hw, g), batch_size, generator)

    def per_rank(self, draw: Any, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``draw(n, generator)[rank slice]``: this rank's ``count`` rows of a global draw (see :meth:`sample_mask`),
        moved to this module's device; a plain ``draw(count, generator)`` outside training steps."""
        if generator is None and self.training and self.step_generator is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            out = draw(count * world, self.step_generator)[rank * count : (rank + 1) * count]
        else:
            out = draw(count, generator)
        return out.to(self.device, non_blocking=True)

    #: RNG of the current training step, the same on every rank (set in :meth:`on_train_batch_start`).
    step_generator: torch.Generator | None = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Seed the step: :attr:`step_generator` (masks, mixing; the same on every rank) from
        ``(seed, epoch, batch_idx)`` and torch's global RNG (drop path, dropout) from that and the rank, where
        ``seed`` is the run's ``seed_everything`` (0 when unset). Every random draw of a step is then a function
        of where the step is, so a run resumed from a step checkpoint repeats the uninterrupted run exactly
        (as fairseq reseeds per update)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        words = [seed, self.current_epoch, batch_idx]
        self.step_generator = torch.Generator().manual_seed(int(np.random.SeedSequence(words).generate_state(1)[0]))
        torch.manual_seed(int(np.random.SeedSequence([*words, self.global_rank + 1]).generate_state(1)[0]))

    def setup(self, stage: str) -> None:
        """Refuse a datamodule whose ``img_size`` differs from the encoder's, before training starts."""
        data_size = getattr(self.trainer.datamodule, "img_size", None) if self._trainer else None
        model_size = getattr(self, "img_size", None) or self.encoder_config.get("model_kwargs", {}).get("img_size")
        if data_size is not None and model_size is not None and data_size != model_size:
            raise ConfigError(
                f"the data gives {data_size} px images but the encoder was built for {model_size} px. "
                f"Fix: set --model.img_size {data_size} (or --data.img_size {model_size})."
            )

    def configure_optimizers(self) -> dict[str, Any]:
        lr = scaled_lr(self.blr, self.lr, self.trainer)
        groups = self.weight_decay_groups()
        optimizer = self.create_optimizer(groups, lr)
        min_ratio = self.min_lr / lr if lr > 0 else 0.0
        schedule = warmup_cosine_scheduler(optimizer, self.trainer, self.warmup_epochs, min_ratio, self.lr_rule(lr))
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def lr_rule(self, lr: float) -> Any:
        """Per-step lr multiplier ``rule(step, warmup_steps, total_steps)`` of a method whose official
        schedule differs from MAE's (:func:`mim.optim.warmup_cosine` to ``min_lr``), or ``None`` for MAE's."""
        return None

    def weight_decay_groups(self) -> list[dict[str, Any]]:
        """``[no-decay, decay]`` parameter groups (:func:`mim.optim.weight_decay_groups`): biases and 1-D
        parameters undecayed, tokens too when ``decay_tokens`` is off; frozen parameters left out."""
        keys = () if self.decay_tokens else TOKEN_KEYS
        return weight_decay_groups(self.named_parameters(), self.weight_decay, keys)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Describe the encoder in the checkpoint (``checkpoint["mim_encoder"]``: timm name, kwargs
        and its ``state_dict`` prefix), so :func:`mim.eval.encoders.load_encoder_from` can rebuild
        it from any method's checkpoint without this class."""
        prefix = next(name for name, module in self.named_modules() if module is self.encoder)
        checkpoint["mim_encoder"] = {**self.encoder_config, "prefix": prefix}

    def create_optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        """The optimiser over the weight-decay ``groups`` of :meth:`weight_decay_groups`:
        AdamW with ``betas`` here; methods whose paper uses another one override this."""
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas)

    def check_finite(
        self, loss: torch.Tensor, name: str = "train/loss", terms: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Return ``loss``, or raise :class:`NonFiniteLossError` when it is NaN/inf, before the backward
        pass: the weights of this step are not updated and no checkpoint of it is written.

        Args:
            loss: the scalar loss.
            name: its name in the message (the logged metric).
            terms: the scalar terms it sums (``{"train/loss_rec": ..., "train/loss_align": ...}``); the
                non-finite ones are named. Read only when ``loss`` is not finite (one device sync per
                call either way).

        Raises:
            NonFiniteLossError: names the global step, the term(s), the usual fixes and the newest
                checkpoint to resume from, when its weights are finite (an update that overflowed before
                this step may have written non-finite weights into it: then an earlier one is asked for).
        """
        finite = torch.isfinite(loss.detach())
        if self._trainer is not None and self.trainer.world_size > 1:  # all ranks stop together, none waits
            finite = self.trainer.strategy.reduce(finite.float(), reduce_op="min") > 0
        if not finite:
            bad = [f"{key} = {value.item()}" for key, value in (terms or {}).items() if not torch.isfinite(value)]
            where = f" ({', '.join(bad)})" if bad else ""
            callbacks = self.trainer.checkpoint_callbacks if self._trainer is not None else []
            names = ("last_model_path", "best_model_path", "_last_checkpoint_saved")  # the newest file counts
            saved = [p for c in callbacks for p in (getattr(c, n, "") for n in names) if p]
            last = max(saved, key=lambda p: os.path.getmtime(p) if os.path.exists(p) else 0.0, default="")
            resume = "--ckpt_path <a .ckpt of this run>"
            try:  # an update of an earlier step may have overflowed: say whether the newest file is usable
                ckpt = torch.load(last, map_location="cpu", weights_only=True, mmap=True) if last else {}
                state = ckpt.get("state_dict", {})
                bad_key = next((k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()), None)
                if state and bad_key is None:
                    resume = f"--ckpt_path {last} (global step {ckpt.get('global_step')}, finite weights)"
                elif state:
                    resume = (
                        f"--ckpt_path <an earlier .ckpt in {os.path.dirname(last)}>: the newest, {last}, already "
                        f"holds non-finite weights ({bad_key}) from an update that overflowed"
                    )
            except Exception:  # noqa: BLE001  (the hint is optional; the error below is not)
                pass
            raise NonFiniteLossError(
                f"{type(self).__name__} {name} became {loss.item()}{where} at global step {self.global_step}. "
                "Fix: lower --model.init_args.blr, lengthen --model.init_args.warmup_epochs, use "
                "--trainer.precision 32 (or bf16-mixed instead of 16-mixed), or add "
                f"--trainer.gradient_clip_val 1.0; then resume with {resume}."
            )
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop before an update with NaN / inf gradients (a finite loss can still overflow in backward), so
        no checkpoint ever holds the weights it would make. Not under ``16-mixed``, whose loss scaler skips such
        steps by design. Gradients are already all-reduced under DDP, so every rank stops at the same step."""
        if str(self.trainer.precision) == "16-mixed":
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            bad = next(n for n, p in self.named_parameters() if p.grad is not None and not p.grad.isfinite().all())
            raise NonFiniteLossError(
                f"{type(self).__name__}: the gradient of {bad} is NaN/inf at global step {self.global_step} "
                "(the loss was finite); the step was not taken. Fix: lower --model.init_args.blr, add "
                "--trainer.gradient_clip_val 1.0 or use --trainer.precision 32; then resume with --ckpt_path last."
            )
