"""End-to-end fine-tuning of a pretrained encoder (from any method) with a fresh classifier head.

The MAE recipe (He et al. 2021, arXiv 2111.06377, Appendix A.3 / Table 9; official ``main_finetune.py``
and ``util/lr_decay.py``): AdamW, layer-wise lr decay, drop path, Mixup/CutMix with label smoothing,
linear warmup then cosine decay, ``lr = blr * effective_batch / 256``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import timm
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mim.errors import ConfigError
from mim.eval.encoders import adopt_preprocessing, load_encoder_from
from mim.methods.base import NO_WEIGHT_DECAY, PretrainModule

GlobalPool = Literal["token", "avg"]


class _StageGroups:
    """``model`` seen through ``group_matcher(coarse=True)``: timm's layer decay then counts ConvNet stages
    (ResNet ``layer1``..``layer4``, ConvNeXt ``stages.i``) rather than single blocks; timm ViTs give one
    group per block either way. Only the two methods ``param_groups_layer_decay`` calls are exposed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def group_matcher(self, coarse: bool = False) -> Any:
        return self.model.group_matcher(coarse=True)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.named_parameters(*args, **kwargs)


def layer_decay_param_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay (MAE Appendix A.3; official ``util/lr_decay.py``).

    Groups come from ``timm.optim.param_groups_layer_decay`` over the model's coarse ``group_matcher``:
    layer ``0`` = stem (ViT: ``patch_embed``, ``cls_token``, ``pos_embed``), then one layer per ViT block
    or per ConvNet stage, the head last. With ``n`` layers, layer ``j`` gets
    ``lr_scale = layer_decay ** (n - 1 - j)``; ViT-B/12: stem ``0.75**13``, block ``i`` ``0.75**(12 - i)``,
    head ``1``. timm puts the final ``norm`` with the last block (MAE's file gives it scale 1).

    Returns:
        dicts with ``params``, ``weight_decay`` (``0`` for biases, norms, position embeddings and tokens),
        ``lr_scale`` and ``lr = lr * lr_scale`` (what a LambdaLR schedule then multiplies).
    """
    target = _StageGroups(model) if hasattr(model, "group_matcher") else model
    groups = param_groups_layer_decay(
        target, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY, layer_decay=layer_decay  # type: ignore[arg-type]
    )  # (_StageGroups is not an nn.Module, but provides all timm calls on it)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


def _avg_pool_vit(model: VisionTransformer, num_classes: int) -> None:
    """MAE's ``global_pool``: mean of the patch tokens, then a fresh LayerNorm (``fc_norm``) that replaces
    the pretrained final ``norm`` (official ``models_vit.py``); what ``timm.create_model(..., global_pool="avg")``
    builds."""
    if isinstance(model.fc_norm, nn.Identity):
        fc_norm = copy.deepcopy(model.norm)
        fc_norm.reset_parameters()
        model.norm, model.fc_norm = nn.Identity(), fc_norm
    model.reset_classifier(num_classes, "avg")


class FineTune(PretrainModule):
    """Fine-tune a whole encoder plus a fresh linear head on a labelled dataset.

    Recipe: MAE (He et al. 2021, arXiv 2111.06377, Appendix A.3 / Table 9; official ``main_finetune.py``).
    The head weight starts at ``trunc_normal(std=2e-5)`` and zero bias, as there.

    Args:
        encoder: what :func:`mim.eval.encoders.load_encoder_from` takes: an exported ``encoder.safetensors``
            (or ``.json``), a ``mim`` pretraining ``.ckpt``, ``"pretrained:<name>.<tag>"`` (timm's public
            weights; its preprocessing is adopted by the datamodule in :meth:`setup`) or ``"timm:<name>"``
            (random init baseline).
        model_kwargs: ``timm.create_model`` kwargs for ``"timm:"`` / ``"pretrained:"`` sources (files carry
            their own).
        num_classes: classes of the head; ``None`` reads ``trainer.datamodule.num_classes``.
        drop_path_rate: stochastic depth of the last block, linear from 0 over the blocks (MAE ViT-B: 0.1).
        layer_decay: lr multiplier per layer from the head down, in ``(0, 1]`` (MAE ViT-B: 0.65, ViT-L: 0.75);
            see :func:`layer_decay_param_groups`. ``1`` disables it.
        blr: base learning rate; ``lr = blr * batch_size * accumulate_grad_batches * world_size / 256``
            (MAE ViT-B: 5e-4; the default 1e-3 suits the short CIFAR runs).
        lr: absolute learning rate; overrides ``blr``.
        weight_decay: AdamW weight decay (not on biases, norms, position embeddings, tokens).
        betas: AdamW betas.
        warmup_epochs: linear warmup (MAE: 5), then cosine decay to ``min_lr`` (per step).
        min_lr: final learning rate of the head; lower layers end at ``min_lr * lr_scale``, as in MAE.
        mixup: Mixup alpha (MAE: 0.8); ``0`` disables.
        cutmix: CutMix alpha (MAE: 1.0); ``0`` disables.
        label_smoothing: label smoothing (MAE: 0.1); applied by ``timm.data.Mixup`` when mixing.
        global_pool: ViT features fed to the head: ``"token"`` (cls token) or ``"avg"`` (mean of patch tokens,
            then a fresh LayerNorm: MAE's default); ``None`` keeps the model's own (ViT: token; ConvNets:
            global average pooling, the only choice for them).
        pretrained_file: the ``.safetensors`` weights of a ``"pretrained:"`` encoder (offline use).

    Training uses ``timm.data.Mixup`` and ``timm.loss.SoftTargetCrossEntropy`` (cross-entropy with
    ``label_smoothing`` when ``mixup == cutmix == 0``). Mixup pairs image ``i`` with ``B-1-i`` so needs an
    even batch: an odd ``batch_size`` is refused at setup, and an odd batch (only from a datamodule that keeps
    its last train batch) loses its last image. Logs ``train/loss``, ``val/loss`` and ``val/top1``,
    ``val/top5`` (torchmetrics, in [0, 1]). The model (``self.encoder``: the timm classifier) is built in
    :meth:`setup`, once ``num_classes`` is known (``encoder_info``: what ``load_encoder_from`` returned, with the
    source's weight hash). Checkpoints describe it (``mim_encoder``), so ``FineTune.load_from_checkpoint`` and
    ``load_encoder_from(<ckpt>)`` rebuild it without the source file; resuming (``--ckpt_path``) loads the source
    once more before the checkpoint's weights replace it.

    Raises:
        ConfigError: ``layer_decay`` outside ``(0, 1]``, negative ``mixup`` / ``cutmix``, another bad value, a
            dataset whose class count differs from ``num_classes``, or an odd batch size with mixing.
    """

    def __init__(
        self,
        encoder: str,
        model_kwargs: dict[str, Any] | None = None,
        num_classes: int | None = None,
        drop_path_rate: float = 0.1,
        layer_decay: float = 0.75,
        blr: float = 1e-3,
        lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_epochs: float = 5.0,
        min_lr: float = 1e-6,
        mixup: float = 0.8,
        cutmix: float = 1.0,
        label_smoothing: float = 0.1,
        global_pool: GlobalPool | None = None,
        pretrained_file: str | None = None,
    ) -> None:
        super().__init__(blr, lr, weight_decay, betas, warmup_epochs, min_lr)
        if not 0 < layer_decay <= 1:
            raise ConfigError(f"layer_decay must lie in (0, 1], got {layer_decay}. Fix: e.g. 0.75; 1 disables it.")
        if mixup < 0 or cutmix < 0:
            raise ConfigError(
                f"mixup and cutmix alphas must be >= 0, got mixup={mixup}, cutmix={cutmix}. Fix: 0 turns one off."
            )
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
        if not 0 <= drop_path_rate < 1:
            raise ConfigError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}.")
        if num_classes is not None and num_classes < 2:
            raise ConfigError(f"num_classes must be >= 2, got {num_classes}. Fix: leave it unset to use the dataset's.")
        if global_pool not in (None, "token", "avg"):
            raise ConfigError(f"global_pool must be 'token', 'avg' or null, got {global_pool!r}.")
        self.save_hyperparameters()
        self.source, self.model_kwargs, self.num_classes = encoder, model_kwargs, num_classes
        self.pretrained_file = pretrained_file
        self.drop_path_rate, self.layer_decay, self.global_pool = drop_path_rate, layer_decay, global_pool
        self.mixup_alpha, self.cutmix_alpha, self.label_smoothing = mixup, cutmix, label_smoothing
        self.mixup_fn: Mixup | None = None

    @property
    def built(self) -> bool:
        return hasattr(self, "encoder")

    def _head_classes(self) -> int:
        """The head's class count: ``num_classes`` (or the built head's), checked against the dataset's."""
        data = getattr(self._trainer, "datamodule", None) if self._trainer else None
        found = getattr(data, "num_classes", None)
        wanted = self.encoder_config["model_kwargs"]["num_classes"] if self.built else self.num_classes
        if wanted is not None and found is not None and found != wanted:
            raise ConfigError(
                f"the dataset has {found} classes but the fine-tune head has num_classes={wanted}. Fix: drop "
                "--model.init_args.num_classes (the dataset's count is used) or use the dataset the head was made for."
            )
        if wanted is None and found is None:
            raise ConfigError("FineTune cannot tell the number of classes. Fix: set --model.init_args.num_classes.")
        return int(wanted if wanted is not None else found)

    def build(self, num_classes: int) -> None:
        """Load the encoder from ``encoder`` with a fresh ``num_classes`` head and ``drop_path_rate``."""
        overrides: dict[str, Any] = {"num_classes": num_classes, "drop_path_rate": self.drop_path_rate}
        model, info = load_encoder_from(self.source, self.model_kwargs, self.pretrained_file, **overrides)
        if self.global_pool is not None and self.global_pool != getattr(model, "global_pool", None):
            if not isinstance(model, VisionTransformer):
                raise ConfigError(
                    f"global_pool={self.global_pool!r} applies to ViTs; {info['model_name']} pools with its own head "
                    "(ConvNets: global average pooling). Fix: leave global_pool unset."
                )
            if self.global_pool == "avg":
                _avg_pool_vit(model, num_classes)
            else:
                model.reset_classifier(num_classes, "token")
            overrides["global_pool"] = self.global_pool
        head = model.get_classifier()
        nn.init.trunc_normal_(head.weight, std=2e-5)
        nn.init.zeros_(head.bias)
        self.encoder_info = info
        self._attach(model, {"model_name": info["model_name"], "model_kwargs": {**info["model_kwargs"], **overrides}})

    def _attach(self, model: nn.Module, config: dict[str, Any]) -> None:
        num_classes = config["model_kwargs"]["num_classes"]
        self.encoder, self.encoder_config = model, config
        self.top1 = MulticlassAccuracy(num_classes, top_k=1)
        self.top5 = MulticlassAccuracy(num_classes, top_k=min(5, num_classes))
        mixing = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        self.mixup_fn = (
            Mixup(self.mixup_alpha, self.cutmix_alpha, label_smoothing=self.label_smoothing, num_classes=num_classes)
            if mixing
            else None
        )
        self.criterion = (
            SoftTargetCrossEntropy() if mixing else nn.CrossEntropyLoss(label_smoothing=self.label_smoothing)
        )

    def setup(self, stage: str) -> None:
        """Build the model (once; the dataset's class count when ``num_classes`` is unset), hand a
        ``"pretrained:"`` encoder's preprocessing to the datamodule (:func:`~mim.eval.encoders.adopt_preprocessing`),
        then check the image size (:meth:`PretrainModule.setup`) and, when mixing, that the batch size is even."""
        num_classes = self._head_classes()
        if not self.built:
            self.build(num_classes)
        adopt_preprocessing(self._trainer, getattr(self, "encoder_info", {}))
        super().setup(stage)
        model_size = getattr(getattr(self.encoder, "patch_embed", None), "img_size", None)
        data_size = getattr(self.trainer.datamodule, "img_size", None)
        fixed = model_size is not None and not getattr(self.encoder, "dynamic_img_size", False)
        if fixed and data_size is not None and tuple(model_size) != (data_size, data_size):
            raise ConfigError(
                f"the data gives {data_size} px images but the encoder takes {tuple(model_size)}. Fix: "
                f"--data.init_args.img_size {model_size[0]} (or model_kwargs img_size {data_size} for a ViT)."
            )
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        if self.mixup_fn is not None and stage == "fit" and batch_size is not None and batch_size % 2:
            raise ConfigError(
                f"Mixup/CutMix pair each image with another, so the batch size must be even, got {batch_size}. "
                "Fix: use an even --data.init_args.batch_size, or --model.init_args.mixup 0 --model.init_args.cutmix 0."
            )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the classifier from the checkpoint's description (``load_from_checkpoint`` outside a
        trainer); a trainer resuming has built it in :meth:`setup` already."""
        if not self.built:
            config = checkpoint["mim_encoder"]
            model = timm.create_model(config["model_name"], pretrained=False, **config["model_kwargs"])
            self._attach(model, {"model_name": config["model_name"], "model_kwargs": config["model_kwargs"]})

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalised images -> ``(B, num_classes)`` logits."""
        return self.encoder(imgs)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        imgs, labels = batch[0], batch[1]
        targets: torch.Tensor = labels
        if self.mixup_fn is not None:
            if len(imgs) % 2:  # Mixup needs pairs: an odd batch drops its last image
                imgs, labels = imgs[:-1], labels[:-1]
            if len(imgs) == 0:
                return None
            imgs, targets = self.mixup_fn(imgs, labels)
        loss = self.check_finite(self.criterion(self(imgs), targets), "train/loss (cross-entropy)")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(imgs))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        imgs, labels = batch[0], batch[1]
        logits = self(imgs)
        self.top1(logits, labels)
        self.top5(logits, labels)
        metrics = {"val/loss": F.cross_entropy(logits.float(), labels), "val/top1": self.top1, "val/top5": self.top5}
        self.log_dict(metrics, prog_bar=True, batch_size=len(imgs))

    def create_optimizer(self, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
        """AdamW over :func:`layer_decay_param_groups` of the classifier (the base's plain weight-decay
        ``groups`` are replaced); the warmup + cosine LambdaLR of the base multiplies each group's lr."""
        groups = layer_decay_param_groups(self.encoder, lr, self.weight_decay, self.layer_decay)
        return torch.optim.AdamW(groups, lr=lr, betas=self.betas)


__all__ = ["FineTune", "layer_decay_param_groups"]
