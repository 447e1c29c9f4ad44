"""Splice-in evaluation of an SAE: what a frozen encoder and a linear head still do when the SAE's reconstruction
replaces the activations of the layer it was trained on (``mim validate -c configs/sae/splice_vit_tiny_cifar10.yaml``).

For every image: the encoder runs clean, and once per splice mode with layer ``L``'s activations replaced
(:mod:`mim.sae.splice`: ``recon`` = the SAE reconstruction, i.e. only the SAE error term removed; ``zero`` and
``mean`` ablation; ``random`` = an error of the SAE's norm in a random direction), then a frozen linear head on the
pooled final features gives class logits. :class:`SpliceMetric` reports (``s`` a splice mode, ``a`` an ablation,
``zero`` or ``mean``):

- ``top1_<s>``: top-1 accuracy of the head (``top1_clean`` without a splice).
- ``accuracy_recovered_<a> = (top1_recon - top1_a) / (top1_clean - top1_a)``: 1 = the reconstruction does as well
  as the real activations, 0 = no better than ablating the layer. The top-1 analogue of "CE loss recovered"
  (SAELens / SAEBench core ``ce_loss_score``; Gao et al. 2024, arXiv 2406.04093, Sec. 4.1 splice the
  reconstruction into the forward pass and measure the downstream loss).
- ``ce_<s>``: the head's cross-entropy with the labels (nats); ``ce_recovered_<a> = (ce_a - ce_recon) /
  (ce_a - ce_clean)`` (SAEBench ``ce_loss_score``).
- ``kl_<s> = mean_images KL(p_clean || p_s)`` (nats), ``p`` the head's softmax; ``kl_recon`` is the KL with only
  the error term removed. ``kl_recovered_<a> = (kl_a - kl_recon) / kl_a`` (SAEBench ``kl_div_score``).
- ``kl_ratio_random = kl_recon / kl_random``: how much more the SAE's error changes the predictions than a random
  error of the same norm (Gurnee 2024, "SAE reconstruction errors are (empirically) pathological": 2-4.5x on
  GPT-2 language-model SAEs).

A ratio whose denominator is 0 is NaN. Ratios of top-1 are noisy on small sets and may leave [0, 1].

The head (:func:`fit_linear_head`): multinomial logistic regression on the clean pooled pre-logits
(``forward_head(pre_logits=True)``) of ``head_images_per_class`` training images per class, the recipe of
:func:`mim.sae.downstream.linear_probe_top1` (standardised inputs, L2 ``weight_decay``, full-batch L-BFGS: a convex,
deterministic fit); or loaded from a file (:func:`save_head` / :func:`load_head`).
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torchmetrics import Metric

from mim.errors import ConfigError, UserError
from mim.eval import encoders
from mim.eval.encoders import load_encoder_from
from mim.export import atomic_write
from mim.features.store import FeatureStore
from mim.sae.models import load_sae
from mim.sae.splice import SPLICE_MODES, SPLICE_TOKENS, check_hook_point, hook_point, num_layers, splice

#: Ablation baselines ``accuracy_recovered`` is reported against.
ABLATIONS = ("zero", "mean")
HEAD_FORMAT = "mim-linear-head"
#: Datamodule arguments that choose which images are used, not how they look: not compared with the store's.
_SELECTION = ("limit_per_class", "val_limit_per_class", "fraction", "seed", "predict_split", "return_index",
              "batch_size", "num_workers", "download", "root", "skip_bad_images", "train_augment", "crop_scale",
              "train_split")
#: Resolved datamodule attributes that decide the pixels the encoder sees (those a datamodule has are compared).
_PIXEL_ATTRS = ("dataset", "img_size", "mean", "std", "eval_crop_pct", "interpolation", "crop_pct", "crop_mode")


# ------------------------------------------------------------------------------------------------------ metric
def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, NaN where ``den == 0``."""
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), torch.full_like(num, math.nan))


class SpliceMetric(Metric):
    """Top-1, cross-entropy and KL of a head's logits with clean and spliced activations (module docstring).

    States are sums (counts, summed cross-entropies and KLs), reduced by summing across DDP ranks, so the result is
    that of all ranks' images together.

    Args:
        modes: splice modes whose logits :meth:`update` gets (subset of :data:`~mim.sae.splice.SPLICE_MODES`).

    Raises:
        ConfigError: an unknown or repeated mode.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, modes: Sequence[str] = SPLICE_MODES, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_modes(modes)
        self.modes = tuple(modes)
        self.add_state("images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("labelled", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("clean", *self.modes):
            self.add_state(f"correct_{name}", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state(f"ce_{name}", torch.tensor(0.0), dist_reduce_fx="sum")
        for name in self.modes:
            self.add_state(f"kl_{name}", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, clean: Tensor, spliced: Mapping[str, Tensor], labels: Tensor) -> None:
        """Add a batch.

        Args:
            clean: ``(B, C)`` logits without a splice.
            spliced: ``{mode: (B, C) logits}`` for every mode of the metric.
            labels: ``(B,)`` int64 class indices; rows ``< 0`` (unlabelled) count for KL only.
        """
        missing = [m for m in self.modes if m not in spliced]
        if missing:
            raise ConfigError(f"SpliceMetric.update lacks the logits of modes {missing}.")
        labelled = labels >= 0
        y = labels[labelled]
        log_clean = F.log_softmax(clean.float(), dim=-1)
        self.images += clean.shape[0]
        self.labelled += int(labelled.sum())
        for name, logits in (("clean", clean), *((m, spliced[m]) for m in self.modes)):
            logits = logits.float()
            kept = logits[labelled]
            setattr(self, f"correct_{name}", getattr(self, f"correct_{name}") + (kept.argmax(-1) == y).sum())
            if len(y):
                setattr(self, f"ce_{name}", getattr(self, f"ce_{name}") + F.cross_entropy(kept, y, reduction="sum"))
            if name != "clean":
                kl = F.kl_div(F.log_softmax(logits, dim=-1), log_clean, reduction="sum", log_target=True)
                setattr(self, f"kl_{name}", getattr(self, f"kl_{name}") + kl)

    def compute(self) -> dict[str, Tensor]:
        """``top1_<mode>``, ``ce_<mode>``, ``kl_<mode>`` and the recovered fractions (module docstring)."""
        labelled, images = self.labelled.float(), self.images.float()
        out: dict[str, Tensor] = {}
        for name in ("clean", *self.modes):
            out[f"top1_{name}"] = _ratio(getattr(self, f"correct_{name}").float(), labelled)
            out[f"ce_{name}"] = _ratio(getattr(self, f"ce_{name}"), labelled)
        for name in self.modes:
            out[f"kl_{name}"] = _ratio(getattr(self, f"kl_{name}"), images)
        if "recon" in self.modes:
            for a in ABLATIONS:
                if a in self.modes:
                    out[f"accuracy_recovered_{a}"] = _ratio(out["top1_recon"] - out[f"top1_{a}"],
                                                            out["top1_clean"] - out[f"top1_{a}"])
                    out[f"ce_recovered_{a}"] = _ratio(out[f"ce_{a}"] - out["ce_recon"], out[f"ce_{a}"] - out["ce_clean"])
                    out[f"kl_recovered_{a}"] = _ratio(out[f"kl_{a}"] - out["kl_recon"], out[f"kl_{a}"])
            if "random" in self.modes:
                out["kl_ratio_random"] = _ratio(out["kl_recon"], out["kl_random"])
        return out


def _check_modes(modes: Sequence[str]) -> None:
    bad = [m for m in modes if m not in SPLICE_MODES]
    if bad or len(set(modes)) != len(modes):
        raise ConfigError(f"modes must be distinct values of {list(SPLICE_MODES)}, got {list(modes)}.")


# -------------------------------------------------------------------------------------------------------- head
class LinearHead(nn.Module):
    """A linear classifier on standardised inputs: ``logits = W ((x - mean) / std) + b``.

    Args:
        dim: input width ``D``.
        num_classes: ``C``.

    Shapes: ``forward`` maps ``(B, D)`` to ``(B, C)`` float32 logits (inputs cast to float32, autocast off).
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.linear((x.float() - self.mean) / self.std)


def fit_linear_head(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float = 1e-2, max_iter: int = 200
) -> LinearHead:
    """Fit a :class:`LinearHead` by the recipe of :func:`mim.sae.downstream.linear_probe_top1`: inputs
    standardised with their mean / std per dimension (constant dimensions left at std 1), zero init, multinomial
    logistic regression with ``weight_decay / 2 * ||W||^2`` on the mean cross-entropy, full-batch L-BFGS with
    strong-Wolfe line search (convex; deterministic). Works inside inference mode and autocast.

    Args:
        x: ``(n, D)`` float features.
        y: ``(n,)`` int64 labels in ``[0, num_classes)``; rows ``< 0`` are left out.
        num_classes: ``C``.
        weight_decay: L2 coefficient.
        max_iter: L-BFGS iterations.

    Returns:
        The head on ``x``'s device.

    Raises:
        ConfigError: no labelled row.
    """
    keep = y >= 0
    if not bool(keep.any()):
        raise ConfigError("The linear head needs labelled images (labels >= 0). Fix: use a labelled dataset.")
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        x, y = x[keep].float().clone(), y[keep].clone()
        head = LinearHead(x.shape[1], num_classes).to(x.device)
        std = x.std(0) if len(x) > 1 else torch.ones_like(x[0])
        head.mean.copy_(x.mean(0))
        head.std.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        nn.init.zeros_(head.linear.weight)
        nn.init.zeros_(head.linear.bias)
        xs = (x - head.mean) / head.std
        optimizer = torch.optim.LBFGS(head.linear.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(head.linear(xs), y) + 0.5 * weight_decay * head.linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return head.requires_grad_(False)


def save_head(head: LinearHead, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``head`` to ``path`` (safetensors, atomically) with string metadata ``info`` (e.g. the encoder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    meta = {"format": HEAD_FORMAT, **{k: json.dumps(v) for k, v in (info or {}).items()}}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    return path


def load_head(path: str | os.PathLike) -> LinearHead:
    """A head written by :func:`save_head`.

    Raises:
        UserError: a missing or unreadable file, or one that is not a head.
    """
    path = Path(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path} is not a readable linear head ({err}). Fix: pass a file written by save_head.") from err
    if set(state) != {"linear.weight", "linear.bias", "mean", "std"}:
        raise UserError(f"{path} is not a linear head (tensors {sorted(state)}). Fix: pass a file written by save_head.")
    head = LinearHead(state["linear.weight"].shape[1], state["linear.weight"].shape[0])
    head.load_state_dict(state)
    return head.requires_grad_(False)


# -------------------------------------------------------------------------------------------------- the store
def store_site(metadata: Mapping[str, Any]) -> tuple[int, bool]:
    """``(layer, final_norm)`` of a feature store: its block / stage, and whether its features were taken after the
    final norm (a ``norm`` field when the store has one, else: the layer is the last, as
    :class:`~mim.features.FeatureExtractor` does it).

    Raises:
        ConfigError: metadata without a single ``layer``.
    """
    layer = metadata.get("layer")
    if not isinstance(layer, int):
        raise ConfigError(
            f"The feature store's metadata has layer {layer!r}, not one block index. Fix: evaluate with the store "
            "of the single layer the SAE was trained on."
        )
    count = metadata.get("num_layers")
    final_norm = metadata.get("norm")
    if final_norm is None:
        final_norm = count is not None and layer % int(count) == int(count) - 1
    return layer, bool(final_norm)


@torch.no_grad()
def store_mean(store: FeatureStore, tokens: str = "patch", batch_size: int = 65536) -> Tensor:
    """Per-dimension mean ``(d,)`` float32 of a store's activations over all its tokens (mean ablation).

    ``tokens="patch"``: the mean over every patch token of every image (from the store's ``mean`` rows when it has
    them: every image has the same token count, so the mean of the per-image means is the token mean; else streamed
    from the ``patch`` rows); ``"cls"``: the mean class token. Accumulated in float64.

    Raises:
        FeatureStoreError: the store lacks the needed token kind.
        ConfigError: an empty store.
    """
    if len(store) == 0:
        raise ConfigError(f"Feature store {store.path} holds no image. Fix: pass the store the SAE was trained on.")
    kind = "cls" if tokens == "cls" else ("mean" if "mean" in store.tokens else "patch")
    total, count = torch.zeros(store.d_model, dtype=torch.float64), 0
    for batch in store.batches(batch_size, tokens=kind, shuffle=False, flatten=kind == "patch"):
        total += batch.features.double().sum(0)
        count += len(batch.features)
    return (total / count).float()


def _init_params(cls: type) -> set[str]:
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def _same(a: Any, b: Any) -> bool:
    """Equal, with float lists compared to 1e-6 (values that went through JSON)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= 1e-6
    return a == b


def check_images(metadata: Mapping[str, Any], datamodule: Any) -> None:
    """Refuse a datamodule whose images are prepared otherwise than the store's (dataset, image size, resize /
    crop, interpolation, normalisation): the SAE would see activations of another input distribution.

    When the store records the extraction's effective ``preprocessing`` and the datamodule has that property, the
    two are compared field by field (``adopted`` aside); otherwise the store's datamodule is rebuilt from its
    metadata (as :func:`mim.sae.viz.store_dataset`) and the resolved attributes of :data:`_PIXEL_ATTRS` that the
    datamodule has are compared.

    Raises:
        ConfigError: a datamodule without ``dataset`` / ``img_size``, a store not extracted from a mim datamodule,
            or any difference (each field named with both values).
    """
    if datamodule is None or not hasattr(datamodule, "img_size") or not hasattr(datamodule, "dataset"):
        raise ConfigError(
            "The splice evaluation needs an ImageDataModule with the store's dataset and image size. Fix: set "
            "data: {class_path: mim.data.ImageDataModule, init_args: {dataset: ..., img_size: ...}}."
        )
    if metadata.get("dataset") is None or metadata.get("img_size") is None:
        raise ConfigError(
            f"The feature store names dataset {metadata.get('dataset')!r} and img_size {metadata.get('img_size')!r}, "
            "so its images cannot be matched. Fix: use a store extracted with mim's ImageDataModule."
        )
    diffs = []
    if metadata["dataset"] != datamodule.dataset:
        diffs.append(f"dataset: store {metadata['dataset']!r}, datamodule {datamodule.dataset!r}")
    stored = metadata.get("preprocessing")
    current = getattr(datamodule, "preprocessing", None)
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        for key in sorted((set(stored) | set(current)) - {"adopted"}):
            want, got = stored.get(key), current.get(key)
            if not _same(want, got):
                diffs.append(f"{key}: store {want!r}, datamodule {got!r}")
    else:
        cls = type(datamodule)
        params = _init_params(cls)
        data = {k: v for k, v in (metadata.get("data") or {}).items() if k in params and k not in _SELECTION}
        try:
            ref = cls(**{**data, "dataset": metadata["dataset"], "img_size": int(metadata["img_size"])})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"The store's data settings {data} do not build a {cls.__name__}: {err}.") from err
        for attr in _PIXEL_ATTRS:
            if attr != "dataset" and hasattr(ref, attr) and hasattr(datamodule, attr):
                want, got = getattr(ref, attr), getattr(datamodule, attr)
                want = list(want) if isinstance(want, tuple) else want
                got = list(got) if isinstance(got, tuple) else got
                if not _same(want, got):
                    diffs.append(f"{attr}: store {want!r}, datamodule {got!r}")
    if diffs:
        fixes = " ".join(f"--data.init_args.{d.split(':')[0]} <store value>" for d in diffs)
        raise ConfigError(
            f"The datamodule prepares images otherwise than the feature store the SAE was trained on ({'; '.join(diffs)}). "
            f"Fix: {fixes} (the values in the store's metadata.json)."
        )


# ------------------------------------------------------------------------------------------------- the module
class SpliceEvaluation(L.LightningModule):
    """Splice-in evaluation of an SAE on the validation images of a datamodule (``mim validate``).

    From the feature store the SAE was trained on it takes the encoder (``encoder_source`` and the weights' hash
    from its metadata), the layer (and whether it was after the final norm: :func:`store_site`), the per-dimension
    activation mean (``mean`` ablation, :func:`store_mean`) and how images were prepared (the datamodule must match:
    :func:`check_images`). Before the first validation batch the head is fitted on ``head_images_per_class``
    clean training images per class of the datamodule's dataset (eval transform; on the device; under DDP rank 0's
    head is broadcast) or loaded from ``head``; the hook point is checked against the extracted features
    (:func:`~mim.sae.splice.check_hook_point`), and a splice that cannot change the head's input is refused.
    Each validation batch runs the encoder ``1 + len(modes)`` times; :class:`SpliceMetric` logs ``splice/<name>``
    at the epoch's end (rank 0 also writes ``splice.json`` and the head, ``splice_head.safetensors``, to the log
    directory).

    Args:
        sae: the SAE (``<name>.safetensors`` with its ``.json``, as ``ExportSAE`` writes).
        store: the feature store the SAE was trained on (its folder).
        encoder: encoder source replacing the store's ``encoder_source`` (e.g. the file moved); its weights must
            hash as the store's.
        tokens: what the SAE was trained on and acts on: ``"patch"`` tokens (prefix tokens pass unchanged) or the
            ``"cls"`` token (:mod:`mim.sae.splice`).
        pool: head input: ``"model"`` = ``forward_head(pre_logits=True)`` (the model's own pooling: class token,
            average, attention pool); ``"avg"`` = the mean of the final patch tokens (for a ViT whose class token
            the splice cannot reach, e.g. patch tokens spliced after the last block).
        modes: splice modes to run (:data:`~mim.sae.splice.SPLICE_MODES`).
        head: a head file (:func:`save_head`) instead of fitting one.
        head_images_per_class: training images per class the head is fitted on.
        weight_decay, max_iter: head fit (:func:`fit_linear_head`).
        seed: seed of the ``random`` mode's directions (plus the rank).

    Raises:
        ConfigError: bad ``tokens`` / ``pool`` / ``modes``; a store of several or no layer, without the token kind;
            an SAE of another width; an encoder whose weights differ from the store's; in ``setup``, a datamodule
            that prepares images otherwise (fields named) or a stage other than validate / test; before the first
            batch, a hook point that does not give the extracted features, or a splice the head cannot see.
        UserError: unreadable SAE / store / head / encoder files.
    """

    def __init__(
        self,
        sae: str,
        store: str,
        encoder: str | None = None,
        tokens: str = "patch",
        pool: str = "model",
        modes: Sequence[str] = SPLICE_MODES,
        head: str | None = None,
        head_images_per_class: int = 100,
        weight_decay: float = 1e-2,
        max_iter: int = 200,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if tokens not in SPLICE_TOKENS:
            raise ConfigError(f"tokens must be one of {list(SPLICE_TOKENS)}, got {tokens!r}.")
        if pool not in ("model", "avg"):
            raise ConfigError(f"pool must be 'model' or 'avg', got {pool!r}.")
        _check_modes(modes)
        if head_images_per_class < 1:
            raise ConfigError(f"head_images_per_class must be >= 1, got {head_images_per_class}.")
        self.tokens, self.pool, self.modes = tokens, pool, tuple(modes)
        feature_store = FeatureStore(store)
        self.store_meta = feature_store.metadata
        self.layer, self.final_norm = store_site(self.store_meta)
        if tokens not in feature_store.tokens:
            raise ConfigError(
                f"Feature store {store} holds {feature_store.tokens} tokens, not {tokens!r}. Fix: pass the store the "
                "SAE was trained on, or --model.init_args.tokens to match it."
            )
        self.sae = load_sae(sae).requires_grad_(False).eval()
        if self.sae.d_model != feature_store.d_model:
            raise ConfigError(
                f"The SAE has d_model {self.sae.d_model} but store {store} has d_model {feature_store.d_model}. Fix: "
                "pass the store the SAE was trained on."
            )
        stored = self.store_meta.get("encoder") or {}
        source = encoder or self.store_meta.get("encoder_source")
        if source is None:
            raise ConfigError(f"Feature store {store} does not name its encoder. Fix: pass --model.init_args.encoder.")
        extra = {"pretrained_file": self.store_meta["pretrained_file"]} if self.store_meta.get("pretrained_file") else {}
        model, self.encoder_info = load_encoder_from(source, stored.get("model_kwargs"), **extra)
        if stored.get("weights_sha256") and self.encoder_info["weights_sha256"] != stored["weights_sha256"]:
            raise ConfigError(
                f"The encoder {source} has other weights than the one store {store} was extracted with (SHA-256 "
                f"{self.encoder_info['weights_sha256'][:12]}... vs {stored['weights_sha256'][:12]}...; a timm:<name> "
                "source is random, so only the same seed gives the same weights). Fix: pass the encoder file the store "
                "was extracted with (--model.init_args.encoder)."
            )
        self.encoder = model.requires_grad_(False).eval()
        if not -num_layers(model) <= self.layer < num_layers(model):
            raise ConfigError(f"The store's layer {self.layer} does not exist in {self.encoder_info['model_name']}.")
        self.hook_name = hook_point(model, self.layer, self.final_norm)[0]
        self.register_buffer("activation_mean", store_mean(feature_store, tokens), persistent=False)
        self.metric = SpliceMetric(self.modes)
        self.head: LinearHead | None = load_head(head) if head else None
        self._generator: torch.Generator | None = None

    def train(self, mode: bool = True) -> SpliceEvaluation:
        """Switch the module's mode; the frozen encoder and SAE stay in eval mode."""
        super().train(mode)
        self.encoder.eval()
        self.sae.eval()
        return self

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self, stage: str) -> None:
        if stage not in ("validate", "test"):
            raise ConfigError(
                f"SpliceEvaluation only evaluates (mim validate / mim test), not {stage!r}. Fix: run mim validate."
            )
        adopt = getattr(encoders, "adopt_preprocessing", None)  # a pretrained encoder's own resize / mean / std
        if adopt is not None:
            adopt(self.trainer, self.encoder_info)
        check_images(self.store_meta, self.trainer.datamodule)

    def pooled(self, imgs: Tensor) -> Tensor:
        """The head's input ``(B, D)``: ``forward_head(pre_logits=True)`` or, with ``pool="avg"``, the mean of the
        final patch tokens (prefix tokens excluded; ConvNet maps averaged over positions)."""
        feats = self.encoder.forward_features(imgs)
        if self.pool == "avg":
            if feats.dim() == 3:
                return feats[:, int(getattr(self.encoder, "num_prefix_tokens", 0)) :].mean(1)
            return feats.mean(dim=(2, 3))
        return self.encoder.forward_head(feats, pre_logits=True)

    def _head_loader(self) -> torch.utils.data.DataLoader:
        dm = self.trainer.datamodule
        if getattr(dm, "dataset", None) == "litdata":
            raise ConfigError(
                "The head cannot be fitted on a streamed (litdata) dataset. Fix: pass a head file "
                "(--model.init_args.head, written by an earlier run as splice_head.safetensors)."
            )
        hp = {k: v for k, v in dict(dm.hparams).items() if not k.startswith("_")}
        params = _init_params(type(dm))
        hp.update(limit_per_class=self.hparams.head_images_per_class, fraction=None, train_augment=False,
                  return_index=False)
        sub = type(dm)(**{k: v for k, v in hp.items() if k in params})
        if self.encoder_info.get("data_config") and hasattr(sub, "adopt_data_config"):
            sub.adopt_data_config(self.encoder_info["data_config"])
        want, got = getattr(dm, "preprocessing", None), getattr(sub, "preprocessing", None)
        if want is not None and not _same([v for k, v in sorted(want.items()) if k != "adopted"],
                                          [v for k, v in sorted(got.items()) if k != "adopted"]):
            raise ConfigError(
                f"The head's training images would be prepared as {got}, the evaluated ones as {want}. Fix: pass a "
                "head file (--model.init_args.head) or set the preprocessing fields of --data.init_args explicitly."
            )
        sub.setup("fit")
        return torch.utils.data.DataLoader(sub.train_set, batch_size=dm.batch_size, shuffle=False, num_workers=0)

    @torch.no_grad()
    def _fit_head(self) -> tuple[LinearHead, Tensor]:
        """Fit the head on clean training images; returns it and the first batch of images."""
        feats, labels, first = [], [], None
        for imgs, y, *_ in self._head_loader():
            imgs = imgs.to(self.device)
            first = imgs if first is None else first
            feats.append(self.pooled(imgs).float())
            labels.append(y.to(self.device))
        num_classes = int(getattr(self.trainer.datamodule, "num_classes", None) or int(torch.cat(labels).max()) + 1)
        head = fit_linear_head(torch.cat(feats), torch.cat(labels), num_classes, self.hparams.weight_decay,
                               self.hparams.max_iter)
        return head, first

    def on_validation_start(self) -> None:
        self._prepare()

    def on_test_start(self) -> None:
        self._prepare()

    def _prepare(self) -> None:
        trainer = self.trainer
        if self.head is None:
            head, imgs = self._fit_head()
            state = trainer.strategy.broadcast({k: v for k, v in head.state_dict().items()}, src=0)
            head.load_state_dict(state)
            self.head = head
            log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
            if trainer.is_global_zero and log_dir:
                path = save_head(head, Path(log_dir) / "splice_head.safetensors", {
                    "encoder": self.encoder_info["weights_sha256"], "pool": self.pool,
                    "head_images_per_class": self.hparams.head_images_per_class})
                rank_zero_info(f"Saved the fitted linear head to {path} (reuse: --model.init_args.head {path}).")
        else:
            loader = self.trainer.datamodule.val_dataloader()
            imgs = next(iter(loader))[0].to(self.device)
        self.head = self.head.to(self.device)
        imgs = imgs[:4]
        check_hook_point(self.encoder, self.layer, imgs, self.final_norm, self.tokens, rtol=1e-3)
        with torch.no_grad():
            clean = self.head(self.pooled(imgs))
            with splice(self.encoder, self.layer, mode="zero", final_norm=self.final_norm, tokens=self.tokens):
                zero = self.head(self.pooled(imgs))
        if torch.equal(clean, zero):
            raise ConfigError(
                f"Replacing the {self.tokens} tokens at {self.hook_name} does not change what the head reads "
                f"(pool {self.pool!r}: e.g. a ViT that pools its class token, spliced after the last block). Fix: "
                "--model.init_args.pool avg, or an SAE of an earlier layer."
            )
        self._generator = torch.Generator(device=self.device).manual_seed(self.hparams.seed + trainer.global_rank)

    # ------------------------------------------------------------------------------------------------ steps
    def logits(self, imgs: Tensor, mode: str | None = None) -> Tensor:
        """Head logits ``(B, C)`` float32 of ``imgs``: clean (``mode=None``) or with ``mode``'s splice."""
        if mode is None:
            return self.head(self.pooled(imgs))
        with splice(self.encoder, self.layer, self.sae, mode, self.activation_mean, self.final_norm, self.tokens,
                    self._generator):
            return self.head(self.pooled(imgs))

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        imgs, labels = batch[0], batch[1]
        clean = self.logits(imgs)
        self.metric.update(clean, {m: self.logits(imgs, m) for m in self.modes}, labels)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def _log_results(self) -> None:
        values = {k: float(v) for k, v in self.metric.compute().items()}
        self.metric.reset()
        self.log_dict({f"splice/{k}": v for k, v in values.items()}, sync_dist=False, rank_zero_only=True)
        trainer = self.trainer
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if trainer.is_global_zero and log_dir and not trainer.sanity_checking:
            result = {"sae": self.hparams.sae, "store": self.hparams.store, "layer": self.layer,
                      "hook": self.hook_name, "tokens": self.tokens, "pool": self.pool, **values}
            path = Path(log_dir) / "splice.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))

    def on_validation_epoch_end(self) -> None:
        self._log_results()

    def on_test_epoch_end(self) -> None:
        self._log_results()

    def configure_optimizers(self) -> None:
        """Nothing is trained."""
        return None


__all__ = [
    "ABLATIONS",
    "LinearHead",
    "SpliceEvaluation",
    "SpliceMetric",
    "check_images",
    "fit_linear_head",
    "load_head",
    "save_head",
    "store_mean",
    "store_site",
]
