"""MixedAE: Mixed Autoencoder for Self-supervised Visual Representation Learning
(Chen, Liu, Hong, Xu, Li, Yeung; CVPR 2023; arXiv 2303.17152).

MAE with image mixing instead of masking, plus homologous recognition. The method in five steps,
each a function or method below:

1. ``sample_sources``: split a batch into groups of ``g = 1/r`` images and draw, for each group, a
   partition of the ``N`` patch positions into ``g`` sets of ``r*N`` positions (``r``: mixing ratio).
2. ``mix_patches``: one mixed image per group, each position taken from the image that owns it.
   The encoder sees ``B*r`` mixed images with all ``N`` tokens each: ``B*r*N`` patch tokens, as many
   as MAE's ``B*(1-0.75)*N`` visible tokens, so its linear layers cost the same as MAE's.
3. ``forward_encoder``: the timm ViT with learned segment embeddings (which source slot a patch
   fills) added to the patch tokens, and homologous attention (each query keeps its top-``K``,
   ``K = r*N``, keys; :mod:`mim.backbones.homologous`) in place of global attention.
4. ``forward_decoder``: un-mix (gather every source's own tokens back) and decode each source image
   with MAE's decoder, mask tokens at the positions the other sources took.
5. ``forward_loss``: MAE's normalised-pixel MSE on those positions + the homologous contrastive loss
   on the encoder's patch features (positives: same source; negatives: the other sources of the mix).

Cost against MAE (the paper's "only 3 % extra overhead", Sec. 1 / Fig. 1): the encoder's linear
layers see ``B*r*N`` patch tokens either way (plus one cls token per mix instead of per image);
only the attention matrices grow, ``(N+1)^2`` per mix instead of ``g*(r*N+1)^2``, i.e. about ``g``
times per image. Per layer that is ``4*L^2*D`` against ``24*L*D^2`` FLOPs of the linear layers, so
for ViT-B/16 at 224 px the encoder costs ~1.6 % more, for ViT-Tiny/4 at 32 px (``D = 192``) ~0 %
(fewer cls tokens offset it). The decoder is MAE's, run on ``B`` images of ``N`` tokens as in MAE.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mim.backbones.homologous import check_homologous_block, homologous_block_forward
from mim.backbones.vit import mae_init_
from mim.decoders.mae import MAEDecoder
from mim.errors import ConfigError
from mim.masking import MaskGenerator, RandomMask, mask_config
from mim.methods.base import PretrainModule
from mim.methods.mae import check_decoder_args, denormalize_patches, init_vit, masked_mse, pixel_target
from mim.patches import mask_to_pixels, patchify, unpatchify


# -- mixing and un-mixing ------------------------------------------------------------------------
def group_size(mixing_ratio: float) -> int:
    """``g = 1/r``, the images mixed into one; :class:`ConfigError` unless ``1/r`` is an integer >= 2."""
    r = float(mixing_ratio)
    g = round(1.0 / r) if 0.0 < r < 1.0 else 0
    if g < 2 or abs(g * r - 1.0) > 1e-6:
        raise ConfigError(
            f"mixing_ratio r must be 1/g for a whole number g >= 2 of mixed images (0.5, 0.25, 0.2, ...), "
            f"got {mixing_ratio}" + (f" (1/r = {1.0 / r:.3g})" if r > 0 else "") + ". "
            "Fix: pass e.g. --model.mixing_ratio 0.25 (MixedAE's default: 4 images per mix)."
        )
    return g


def sample_sources(
    num_mixes: int,
    grid_hw: tuple[int, int],
    group: int,
    mask_generator: MaskGenerator,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw which source image owns each patch position of each mixed image.

    Source slot 0 owns the *visible* positions of a mask from ``mask_generator`` (built with
    ``mask_ratio = 1 - r``, so exactly ``r*N`` visible); the other ``(1-r)*N`` positions are split
    uniformly at random into ``g - 1`` equal sets for slots ``1 .. g-1``. Thus the result is always a
    partition with ``r*N`` positions per slot; with :class:`~mim.masking.RandomMask` (the default)
    it is a uniformly random partition (a random permutation cut into ``g`` equal chunks), and for
    ``g = 2`` it is exactly the generator's mask and its complement. A general mask generator draws
    one set per call, not ``g`` disjoint ones, so only slot 0 follows its pattern for ``g > 2``.

    Args:
        num_mixes: ``M``, mixed images to draw for.
        grid_hw: ``(h, w)`` patch grid, ``N = h*w``, divisible by ``group``.
        group: ``g = 1/r``.
        mask_generator: called as ``mask_generator(M, grid_hw, generator)``; must mask ``N - N/g``.
        generator: RNG for reproducible draws (its device is used); ``None``: global RNG, CPU.

    Returns:
        ``(M, N)`` int64 in ``[0, g)``, each value exactly ``N/g`` times per row.

    Raises:
        ValueError: the mask generator masked another number of positions than ``N - N/g``.
    """
    num_patches = grid_hw[0] * grid_hw[1]
    own = num_patches // group
    mask = mask_generator(num_mixes, grid_hw, generator)
    visible = (~mask).sum(dim=1)
    if not bool((visible == own).all()):
        raise ValueError(
            f"the mask generator {mask_generator!r} left {visible.tolist()[:4]}... positions visible, but "
            f"MixedAE needs exactly r*N = {own} per mixed image (mask_ratio = 1 - r)."
        )
    noise = torch.rand(num_mixes, num_patches, generator=generator, device=mask.device)
    # Slot 0 (the visible positions) sorts first, the masked positions after it in random order.
    order = torch.argsort(noise + 2.0 * mask.to(noise.dtype), dim=1)
    slot_of_rank = torch.arange(num_patches, device=mask.device).div(own, rounding_mode="floor")
    return torch.empty_like(order).scatter_(1, order, slot_of_rank.expand(num_mixes, -1))


def mix_patches(patches: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Mix groups of consecutive images patch-wise (MixedAE Sec. 3, mixing).

    Args:
        patches: ``(B, N, D)`` per-image patches or tokens, ``B = M*g``; images ``m*g .. m*g+g-1``
            form group ``m`` (slot ``s`` of group ``m`` is image ``m*g + s``).
        sources: ``(M, N)`` int64 source slot per position (:func:`sample_sources`).

    Returns:
        ``(M, N, D)``: ``mixed[m, n] = patches[m*g + sources[m, n], n]``.
    """
    num_mixes, num_patches = sources.shape
    grouped = patches.reshape(num_mixes, -1, num_patches, patches.shape[-1])  # (M, g, N, D)
    index = sources[:, None, :, None].expand(-1, 1, -1, patches.shape[-1])
    return grouped.gather(1, index).squeeze(1)


def source_ids(sources: torch.Tensor, group: int) -> torch.Tensor:
    """Positions each source image owns: ``(M, N)`` -> ``(B, N/g)`` int64, increasing in each row.

    Row ``m*g + s`` lists the positions of slot ``s`` in mix ``m``: that image's "visible" patches
    in MAE terms (``ids_keep`` of :class:`~mim.decoders.mae.MAEDecoder`).
    """
    order = torch.sort(sources, dim=1, stable=True).indices  # slot 0's positions, then slot 1's, ...
    return order.reshape(sources.shape[0] * group, -1)


def source_mask(sources: torch.Tensor, group: int) -> torch.Tensor:
    """``(M, N)`` -> ``(B, N)`` bool, ``True`` where another source of the mix owns the position
    (the positions each image must reconstruct: its "masked" patches)."""
    slots = torch.arange(group, device=sources.device).repeat(sources.shape[0])
    return sources.repeat_interleave(group, dim=0) != slots[:, None]


def unmix_tokens(tokens: torch.Tensor, ids: torch.Tensor, group: int) -> torch.Tensor:
    """Gather each source image's own tokens back out of its mix.

    Args:
        tokens: ``(M, N, D)`` per-position tokens of the mixed images.
        ids: ``(B, N/g)`` positions of each source (:func:`source_ids`), ``B = M*g``.
        group: ``g``.

    Returns:
        ``(B, N/g, D)``: ``out[b, j] = tokens[b // g, ids[b, j]]``.
    """
    num_mixes, num_patches, dim = tokens.shape
    mix_of_row = torch.arange(ids.shape[0], device=ids.device).div(group, rounding_mode="floor")
    flat = ids + (mix_of_row * num_patches)[:, None]
    return tokens.reshape(num_mixes * num_patches, dim)[flat]


# -- homologous contrastive loss -----------------------------------------------------------------
def homologous_contrastive_loss(features: torch.Tensor, sources: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised-contrastive loss among the patches of each mixed image (MixedAE Sec. 3,
    homologous contrastive; the loss form of Khosla et al. 2020, arXiv 2004.11362, Eq. 2).

    For patch ``i`` with homologous set ``P(i)`` (other patches of the same source image) and
    ``A(i)`` (all other patches of the same mixed image), with ``s = cos / temperature``::

        l_i = -1/|P(i)| * sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )

    averaged over all patches of all mixes. Its infimum is ``log(|P(i)|) = log(r*N - 1)``, reached
    as same-source features align and the others move apart; with the ``g`` sources at the vertices
    of a regular simplex (cosine ``-1/(g-1)`` between sources) it is
    ``log(|P| + (N - r*N) * exp((-1/(g-1) - 1)/temperature))``.

    Args:
        features: ``(M, N, D)`` patch features (computed in float32).
        sources: ``(M, N)`` int64 source slot of each position; every slot at least twice per row.
        temperature: softmax temperature ``> 0``.

    Returns:
        Scalar float32 loss.
    """
    z = F.normalize(features.float(), dim=-1)
    logits = z @ z.transpose(1, 2) / temperature  # (M, N, N)
    self_pair = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    log_prob = logits - logits.logsumexp(dim=-1, keepdim=True)
    positive = (sources[:, :, None] == sources[:, None, :]) & ~self_pair
    per_patch = -log_prob.masked_fill(~positive, 0.0).sum(-1) / positive.sum(-1)
    return per_patch.mean()


class MixedAEOutput(NamedTuple):
    """What :meth:`MixedAE.forward` returns (``out[0]`` is the loss, as for MAE).

    ``loss``: scalar total; ``pred``: ``(B, N, p*p*3)`` predictions for every patch of every source
    image; ``mask``: ``(B, N)`` bool, ``True`` = position owned by another source (reconstructed);
    ``recon_loss``, ``contrastive_loss``: scalar parts; ``sources``: ``(B/g, N)`` the mixing.
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    recon_loss: torch.Tensor
    contrastive_loss: torch.Tensor
    sources: torch.Tensor


class MixedAE(PretrainModule):
    """Mixed autoencoder on a timm ``VisionTransformer`` (Chen et al., CVPR 2023, arXiv 2303.17152).

    Args:
        backbone: timm ViT name, e.g. ``"vit_tiny_patch16_224"``.
        img_size: input side in pixels, divisible by ``patch_size``.
        patch_size: patch side in pixels (4 for 32 px images: an 8x8 grid).
        backbone_kwargs: more ``timm.create_model`` kwargs (e.g. ``drop_path_rate``).
        mixing_ratio: ``r``, the share of each mixed image one source owns; ``1/r`` images are mixed
            (paper default 0.25: each image keeps ``r*N`` patches, as many as MAE's 75 % masking
            leaves visible). ``N`` must be divisible by ``1/r``.
        mask: mask-generator factory called as ``mask(1 - mixing_ratio)``; the first source slot of
            each mix owns its visible positions (:func:`sample_sources`). Default uniform.
        homologous_layers: encoder block indices that use homologous attention; ``None`` = all
            blocks, ``[]`` = none (global attention everywhere).
        segment_embedding: add one learned embedding per source slot to the patch tokens.
        contrastive_weight: weight of the homologous contrastive loss (0 disables it).
        temperature: temperature of the homologous contrastive loss.
        cls_attention: how homologous attention treats the prefix (cls) key: ``"always"`` (every
            query attends to it, the top-``K`` runs over the ``N`` patch keys) or ``"topk"`` (it competes
            with the patch keys for the ``K`` places like any other key).
        decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio: MAE decoder size.
        norm_pix_loss: regress per-patch normalised pixels (MAE's target, which MixedAE keeps).
        blr, lr, weight_decay, betas, warmup_epochs, min_lr, decay_tokens: see :class:`PretrainModule`
            (defaults: MAE's recipe, which MixedAE builds on: blr 1.5e-4, wd 0.05, betas (0.9, 0.95)).

    Raises:
        ConfigError: ``1/mixing_ratio`` not a whole number >= 2; ``N`` not divisible by ``1/r`` or
            fewer than 2 patches per source; a homologous layer index out of range; a non-ViT or
            unknown backbone or bad ``backbone_kwargs``; ``temperature <= 0``; ``contrastive_weight < 0``;
            ``cls_attention`` not ``"always"`` / ``"topk"``;
            a decoder that cannot be built or learn (:func:`~mim.methods.mae.check_decoder_args`). At ``setup`` /
            ``forward``: a batch size that is not a positive multiple of ``1/r``.

    Batches are ``(imgs, labels)`` with ``imgs: (B, 3, H, W) float32`` normalised, ``B`` a multiple
    of ``g = 1/r`` in training (images ``m*g .. m*g+g-1`` are mixed together; the loader shuffles).
    Validation drops the last ``B mod g`` images of a short last batch (``drop_last`` is off there)
    and skips a batch with fewer than ``g`` images, so ``val/loss`` is over whole groups only.

    Paper facts used (arXiv 2303.17152; section names as in the paper): mixing ``1/r`` images
    patch-wise with every position from exactly one image and ``r = 0.25`` by default (Sec. 3,
    mixing); un-mixing and per-image MAE reconstruction with mask tokens at the other images'
    positions (Sec. 3); segment embeddings marking each patch's source (Sec. 3); homologous attention
    ``softmax(TopK(QK^T/sqrt(d)))V`` with ``K = r*N`` (Sec. 3); the homologous contrastive loss with
    homologous patches as positives (Sec. 3); the MAE pretraining recipe; "only 3 % extra overhead"
    over MAE (Sec. 1, Fig. 1).

    Choices the paper text did not confirm here, each with the constructor argument that sets it:

    | choice | argument (default) | default behaviour |
    |---|---|---|
    | contrastive temperature | ``temperature`` (0.1) | SupCon's default for this loss form |
    | contrastive weight | ``contrastive_weight`` (1.0) | a plain sum of the two losses |
    | blocks with homologous attention | ``homologous_layers`` (``None`` = all) | every encoder block |
    | segment embedding | ``segment_embedding`` (``True``) | one learned vector per source slot added to the patch tokens, kept in this module (fine-tuning inputs are not mixed), init N(0, 0.02), decayed as a 2-D weight |
    | cls key in homologous attention | ``cls_attention`` (``"always"``) | the mix has one cls token, owned by no source; every query attends to it and the top-``K`` (``K = r*N``) runs over the ``N`` patch keys |
    | weight decay of cls / mask tokens | ``decay_tokens`` (``True``) | decayed, as MAE's official rule |
    | mixing positions | ``mask`` (``RandomMask``) | slot 0 owns the generator's visible positions, the rest a uniform split (:func:`sample_sources`) |

    Fixed (not arguments): each source's decoder input starts with its mix's cls token; the contrastive
    features are the encoder's final (normed) patch tokens, no projection head; the negatives are the other
    patches of the same mixed image only (the pretext is recognising homologous patches within one mix),
    in SupCon's "outside-log" form.
    """

    def __init__(
        self,
        backbone: str = "vit_tiny_patch16_224",
        img_size: int = 224,
        patch_size: int = 16,
        backbone_kwargs: dict[str, Any] | None = None,
        mixing_ratio: float = 0.25,
        mask: Callable[[float], MaskGenerator] = RandomMask,
        homologous_layers: Sequence[int] | None = None,
        segment_embedding: bool = True,
        contrastive_weight: float = 1.0,
        temperature: float = 0.1,
        cls_attention: Literal["always", "topk"] = "always",
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        blr: float = 1.5e-4,
        lr: float | None = None,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_epochs: float = 40.0,
        min_lr: float = 0.0,
        decay_tokens: bool = True,
    ) -> None:
        super().__init__(blr, lr, weight_decay, betas, warmup_epochs, min_lr, decay_tokens)
        self.group_size = group_size(mixing_ratio)
        check_decoder_args(decoder_embed_dim, decoder_depth, decoder_num_heads, mlp_ratio)
        if temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}. Fix: e.g. --model.temperature 0.1.")
        if contrastive_weight < 0:
            raise ConfigError(f"contrastive_weight must be >= 0, got {contrastive_weight}.")
        if cls_attention not in ("always", "topk"):
            raise ConfigError(
                f"cls_attention must be 'always' or 'topk', got {cls_attention!r}. Fix: --model.init_args.cls_attention always."
            )
        self.cls_attention = cls_attention
        self.mask_generator = mask(1.0 - mixing_ratio)
        self.save_hyperparameters(ignore=["mask"])
        self.hparams["mask"] = mask_config(self.mask_generator)  # a config: --ckpt_path resumes
        self.patch_size, self.norm_pix_loss = patch_size, norm_pix_loss
        self.contrastive_weight, self.temperature = contrastive_weight, temperature
        init_vit(self, backbone, img_size, patch_size, backbone_kwargs)
        num_patches = self.grid_hw[0] * self.grid_hw[1]
        if num_patches % self.group_size or num_patches // self.group_size < 2:
            raise ConfigError(
                f"the {self.grid_hw[0]}x{self.grid_hw[1]} patch grid ({num_patches} patches) cannot be split "
                f"into {self.group_size} equal parts of at least 2 patches (mixing_ratio {mixing_ratio}). "
                "Fix: choose mixing_ratio / patch_size so that the patch count is a multiple of 1/mixing_ratio."
            )
        self.topk = num_patches // self.group_size  # K = r * N
        depth = len(self.encoder.blocks)
        layers = range(depth) if homologous_layers is None else [int(i) for i in homologous_layers]
        bad = [i for i in layers if not -depth <= i < depth]
        if bad:
            raise ConfigError(f"homologous_layers {bad} out of range for a {depth}-block encoder (0..{depth - 1}).")
        self.homologous_layers = frozenset(i % depth for i in layers)
        for i in sorted(self.homologous_layers):
            check_homologous_block(self.encoder.blocks[i])
        self.segment_embed = (
            nn.Parameter(torch.zeros(self.group_size, self.encoder.embed_dim)) if segment_embedding else None
        )
        self.decoder = MAEDecoder(
            self.grid_hw,
            embed_dim=self.encoder.embed_dim,
            decoder_embed_dim=decoder_embed_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            out_dim=patch_size * patch_size * self.encoder.patch_embed.proj.in_channels,
            num_prefix_tokens=self.encoder.num_prefix_tokens,
            mlp_ratio=mlp_ratio,
        )
        mae_init_(self)
        if self.segment_embed is not None:
            nn.init.normal_(self.segment_embed, std=0.02)

    # -- input checks -------------------------------------------------------------------------
    def check_batch_size(self, batch_size: int, what: str = "the batch size") -> None:
        """Raise :class:`ConfigError` unless ``batch_size`` is a positive multiple of ``g = 1/r``."""
        g = self.group_size
        if batch_size < g or batch_size % g:
            suggestion = max(g, round(batch_size / g) * g)
            raise ConfigError(
                f"MixedAE mixes groups of {g} images (1/mixing_ratio), so {what} must be a positive multiple "
                f"of {g}; got {batch_size}. Fix: --data.batch_size {suggestion} (or another multiple of {g})."
            )

    def setup(self, stage: str) -> None:
        """Refuse, before any step, a datamodule ``batch_size`` that does not split into groups."""
        super().setup(stage)
        datamodule = self.trainer.datamodule if self._trainer else None
        batch_size = getattr(datamodule, "batch_size", None)
        if batch_size is not None:
            self.check_batch_size(int(batch_size), "the datamodule's batch_size")

    # -- the method ---------------------------------------------------------------------------
    def sample_sources(self, num_mixes: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(M, N)`` int64 source slot per position, on this module's device (:func:`sample_sources`)."""
        def draw(n: int, g: torch.Generator | None) -> torch.Tensor:
            return sample_sources(n, self.grid_hw, self.group_size, self.mask_generator, g)

        return self.per_rank(draw, num_mixes, generator)  # groups never straddle ranks

    def mix(self, imgs: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)``, ``(B/g, N)`` -> ``(B/g, 3, H, W)`` mixed images."""
        return unpatchify(mix_patches(patchify(imgs, self.patch_size), sources), self.patch_size, self.grid_hw)

    def forward_encoder(self, mixed: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        """Encode mixed images with all their tokens.

        Position embeddings (by place) and segment embeddings (by source slot) are added to the
        patch tokens; blocks in ``homologous_layers`` run homologous attention with ``K = r*N``.

        Args:
            mixed: ``(M, 3, H, W)`` mixed images.
            sources: ``(M, N)`` source slots.

        Returns:
            ``(M, P + N, D)`` after the final norm, ``P`` = prefix tokens (cls).
        """
        vit = self.encoder
        prefix = vit.num_prefix_tokens
        x = vit._pos_embed(vit.patch_embed(mixed))
        if self.segment_embed is not None:
            x = torch.cat([x[:, :prefix], x[:, prefix:] + self.segment_embed[sources].to(x.dtype)], dim=1)
        x = vit.norm_pre(x)
        use_checkpoint = vit.grad_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(vit.blocks):
            if i in self.homologous_layers:
                kept = prefix if self.cls_attention == "always" else 0  # "topk": prefix keys compete too
                run = lambda t, b=block, p=kept: homologous_block_forward(b, t, self.topk, p)  # noqa: E731
            else:
                run = block
            x = checkpoint(run, x, use_reentrant=False) if use_checkpoint else run(x)
        return vit.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Un-mix and decode every source image.

        Args:
            latent: ``(M, P + N, D)`` encoder output of the mixed images.
            ids: ``(B, N/g)`` positions of each source (:func:`source_ids`).

        Returns:
            ``(B, N, p*p*3)`` predictions; each source's decoder input is its mix's prefix tokens,
            then its own tokens at their places and mask tokens where other sources were.
        """
        prefix = self.encoder.num_prefix_tokens
        own = unmix_tokens(latent[:, prefix:], ids, self.group_size)
        prefix_tokens = latent[:, :prefix].repeat_interleave(self.group_size, dim=0)
        return self.decoder(torch.cat([prefix_tokens, own], dim=1), ids)

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, latent: torch.Tensor, sources: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(total, reconstruction, contrastive)`` scalars: MAE's masked MSE over every source image
        (:func:`~mim.methods.mae.masked_mse` on :func:`~mim.methods.mae.pixel_target`) plus
        ``contrastive_weight`` x :func:`homologous_contrastive_loss` of the encoder's patch tokens."""
        recon = masked_mse(pred, pixel_target(imgs, self.patch_size, self.norm_pix_loss), mask)
        if self.contrastive_weight > 0:
            patch_latent = latent[:, self.encoder.num_prefix_tokens :]
            contrast = homologous_contrastive_loss(patch_latent, sources, self.temperature)
        else:
            contrast = recon.new_zeros(())
        return recon + self.contrastive_weight * contrast, recon, contrast

    def forward(self, imgs: torch.Tensor, sources: torch.Tensor | None = None) -> MixedAEOutput:
        """Mix, encode, un-mix, decode and score a batch.

        Args:
            imgs: ``(B, 3, H, W)``, ``B`` a positive multiple of ``g``.
            sources: ``(B/g, N)`` int64 mixing (:meth:`sample_sources`); drawn when ``None``.

        Returns:
            :class:`MixedAEOutput` (``out[0]`` is the scalar loss).

        Raises:
            ConfigError: ``B`` is not a positive multiple of ``g``.
        """
        self.check_batch_size(imgs.shape[0])
        if sources is None:
            sources = self.sample_sources(imgs.shape[0] // self.group_size)
        latent = self.forward_encoder(self.mix(imgs, sources), sources)
        ids = source_ids(sources, self.group_size)
        pred = self.forward_decoder(latent, ids)
        mask = source_mask(sources, self.group_size)
        loss, recon, contrast = self.forward_loss(imgs, pred, mask, latent, sources)
        return MixedAEOutput(loss, pred, mask, recon, contrast, sources)

    # -- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        out = self(batch[0])
        terms = {"train/recon_loss": out.recon_loss, "train/contrastive_loss": out.contrastive_loss}
        loss = self.check_finite(out.loss, "train/loss", terms)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # the mean over ranks
        self.log_dict({"train/recon_loss": out.recon_loss, "train/contrastive_loss": out.contrastive_loss})
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        # Whole groups only: a short last batch loses its last B mod g images (or is skipped).
        imgs = batch[0]
        usable = imgs.shape[0] // self.group_size * self.group_size
        if usable == 0:
            return None
        imgs = imgs[:usable]
        # A fixed mixing per batch index keeps the validation loss comparable across epochs.
        generator = torch.Generator().manual_seed(batch_idx)
        out = self(imgs, self.sample_sources(usable // self.group_size, generator))
        self.log("val/loss", out.loss, prog_bar=True, sync_dist=True, batch_size=usable)
        self.log_dict(
            {"val/recon_loss": out.recon_loss, "val/contrastive_loss": out.contrastive_loss},
            sync_dist=True,
            batch_size=usable,
        )
        return out.loss

    @torch.no_grad()
    def reconstruct(self, imgs: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Each image's reconstruction from its mix, for pictures, in normalised pixel space.

        ``imgs`` are mixed in consecutive groups of ``g``; a count that is not a multiple of ``g``
        is padded by repeating images from the start (the padding's outputs are dropped). As for
        MAE, predictions are brought back to pixels with the true patch's mean and variance when
        ``norm_pix_loss``, and each image's own patches are pasted from the input.

        Returns:
            ``{"mask": (B, 1, H, W) float 1 = position taken by another image,
            "reconstruction": (B, 3, H, W), "mixed": (B, 3, H, W) the mixed image each one was in}``.
        """
        count, g = imgs.shape[0], self.group_size
        total = max(g, math.ceil(count / g) * g)
        batch = imgs[torch.arange(total, device=imgs.device) % count]
        out = self(batch, self.sample_sources(total // g, generator))
        pred = out.pred
        if self.norm_pix_loss:
            pred = denormalize_patches(pred, patchify(batch, self.patch_size))
        recon = unpatchify(pred.to(imgs.dtype), self.patch_size, self.grid_hw)
        pixels = mask_to_pixels(out.mask, self.patch_size, self.grid_hw).to(imgs.dtype)
        mixed = self.mix(batch, out.sources).repeat_interleave(g, dim=0)
        return {
            "mask": pixels[:count],
            "reconstruction": (recon * pixels + batch * (1 - pixels))[:count],
            "mixed": mixed[:count],
        }
