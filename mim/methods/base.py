"""What every pretraining method shares: AdamW parameter groups, the warmup + cosine schedule,
the MAE learning-rate scaling rule, a finite-loss check and the description of the encoder to export.

Nothing else lives here: each method writes its own forward and loss in its own module.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from timm.optim import param_groups_weight_decay

from mim.backbones.vit import create_vit
from mim.errors import ConfigError
from mim.optim import scaled_lr, warmup_cosine_scheduler

#: Parameters that never get weight decay, besides biases and 1-D (norm) parameters
#: (MAE's ``optim_factory.param_groups_weight_decay`` with the model's ``no_weight_decay()``).
NO_WEIGHT_DECAY = ("*pos_embed", "*cls_token", "*reg_token", "*dist_token", "*mask_token")


class PretrainModule(L.LightningModule):
    """Base LightningModule of the pretraining methods (optimiser, schedule, export description).

    Args:
        blr: base learning rate; the used rate is ``lr = blr * effective_batch / 256`` (MAE Appendix
            A.1, "linear lr scaling rule"), ``effective_batch = batch_size * accumulate * world_size``.
        lr: absolute learning rate; overrides ``blr`` when given.
        weight_decay: AdamW weight decay (MAE: 0.05), not applied to biases, norms, position
            embeddings and tokens.
        betas: AdamW betas (MAE: (0.9, 0.95)).
        warmup_epochs: linear warmup length in epochs (fractions allowed), converted to steps.
        min_lr: final learning rate of the cosine decay.

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
    ) -> None:
        super().__init__()
        if (lr is None and blr < 0) or (lr is not None and lr < 0):
            raise ConfigError(f"learning rate must be >= 0, got blr={blr}, lr={lr}.")
        if warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {warmup_epochs}.")
        self.blr, self.lr, self.weight_decay = blr, lr, weight_decay
        self.betas, self.warmup_epochs, self.min_lr = tuple(betas), warmup_epochs, min_lr

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

    def sample_mask(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, L)`` bool mask (``True`` = masked) from ``mask_generator``, on this module's device."""
        return self.mask_generator(batch_size, self.grid_hw, generator).to(self.device, non_blocking=True)

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
        groups = param_groups_weight_decay(self, self.weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
        optimizer = self.create_optimizer(groups, lr)
        min_ratio = self.min_lr / lr if lr > 0 else 0.0
        schedule = warmup_cosine_scheduler(optimizer, self.trainer, self.warmup_epochs, min_ratio)
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Describe the encoder in the checkpoint (``checkpoint["mim_encoder"]``: timm name, kwargs
        and its ``state_dict`` prefix), so :func:`mim.eval.encoders.load_encoder_from` can rebuild
        it from any method's checkpoint without this class."""
        prefix = next(name for name, module in self.named_modules() if module is self.encoder)
        checkpoint["mim_encoder"] = {**self.encoder_config, "prefix": prefix}

    def create_optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        """The optimiser over timm's weight-decay ``groups`` (no decay for biases, norms, tokens):
        AdamW with ``betas`` here; methods whose paper uses another one override this."""
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas)

    def check_finite(self, loss: torch.Tensor, name: str = "loss") -> torch.Tensor:
        """Return ``loss``, or raise ``FloatingPointError`` naming the step when it is NaN/inf."""
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{type(self).__name__} {name} became {loss.item()} at global step {self.global_step}. "
                "Fix: lower --model.blr, lengthen --model.warmup_epochs, use --trainer.precision 32 "
                "(or bf16-mixed instead of 16-mixed), or add --trainer.gradient_clip_val 1.0; then "
                "resume from the last checkpoint with --ckpt_path last."
            )
        return loss
