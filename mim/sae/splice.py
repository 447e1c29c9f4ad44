"""Splice a sparse autoencoder into a frozen timm encoder: replace, ablate or edit the activations of one layer.

Everything here is a context manager that registers one forward hook on timm's own module and removes it on exit
(also when the body raises); no module or method of the model is replaced or patched. A hook that returns a value
replaces that module's output, so the rest of the encoder runs on the edited activations (PyTorch
``register_forward_hook``).

Where the hook sits (:func:`hook_point`), so that the SAE sees exactly the features it was trained on
(:class:`mim.features.FeatureExtractor`, timm ``forward_intermediates``):

- ViT: ``layer`` indexes ``model.blocks``; the hook is on ``model.blocks[layer]`` (its output is the residual
  stream after that block). When the store's layer is the last block the stored features were taken after the
  final norm (``forward_intermediates(..., norm=True)``, i.e. ``forward_features``), so the hook sits on
  ``model.norm`` instead: the activations are replaced after the final norm and before pooling / ``fc_norm`` /
  the head.
- ConvNets: ``layer`` indexes ``model.feature_info`` (stem and stages, as the extractor counts them); the hook is
  on the module ``feature_info[layer]["module"]`` names (e.g. ``layer3`` of a ResNet). A final norm after the
  last stage (ConvNeXt's ``norm_pre``) gets the hook instead when ``final_norm`` is set.

Which tokens the SAE acts on (``tokens``):

- ``"patch"`` (default): the patch tokens only, one row per token (ViT ``(B, P + N, d)`` -> the ``N`` patch rows;
  ConvNet stage maps ``(B, C, H, W)`` -> ``(B * H * W, C)``, i.e. every spatial position is a token). The ``P``
  prefix tokens (class and register tokens, ``model.num_prefix_tokens``) pass unchanged, as the extractor stores
  them apart; SAEBench likewise leaves special tokens (BOS) out of the splice
  (``exclude_special_tokens_from_reconstruction``).
- ``"cls"``: the class token only (ViT with a class token); every other token passes unchanged.

The replacements (:data:`SPLICE_MODES`, with ``x`` a token's activation and ``x_hat = sae.decode(sae.encode(x))``):

- ``"recon"``: ``x -> x_hat``. This is also the splice with *only the SAE error term removed*: writing
  ``x = x_hat + e`` with the error ``e = x - x_hat`` (the "error node" of Marks et al. 2024, arXiv 2403.19647,
  Sec. 2; SAELens ``use_error_term``), removing ``e`` leaves ``x_hat``.
- ``"zero"``: ``x -> 0`` (zero ablation, the baseline of SAELens' / SAEBench's "CE loss recovered").
- ``"mean"``: ``x -> mu``, the per-dimension mean of the layer's activations over all tokens of a feature store
  (mean ablation; one vector for every position).
- ``"random"``: ``x -> x + ||e|| u`` with ``u`` a uniformly random unit vector per token: an error of the same norm
  as the SAE's but a random direction (the epsilon-random baseline of Gurnee 2024, "SAE reconstruction errors are
  (empirically) pathological", AI Alignment Forum).

:func:`intervene` edits chosen latents instead: encode, ablate / clamp, decode, and (``keep_error``) add the error
term back, so an empty edit leaves the activations bit for bit unchanged (SAELens ``use_error_term=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from mim.errors import ConfigError
from mim.sae.kernels import sparse_decode
from mim.sae.variants import SparseCode

if TYPE_CHECKING:
    from mim.sae.variants import SparseAutoencoder

#: Replacements :func:`splice` knows (module docstring).
SPLICE_MODES = ("recon", "zero", "mean", "random")
#: Token sets the SAE can act on.
SPLICE_TOKENS = ("patch", "cls")

#: ``(N, d) float tokens -> (N, d)``: what a hook does to the selected tokens.
TokenFn = Callable[[Tensor], Tensor]


def num_layers(model: nn.Module) -> int:
    """Blocks / stages a layer index can name: ``len(model.feature_info)`` (as :class:`~mim.features.FeatureExtractor`).

    Raises:
        ConfigError: a model without timm ``feature_info``.
    """
    info = getattr(model, "feature_info", None)
    if not info:
        raise ConfigError(
            f"{type(model).__name__} has no timm feature_info, so its layers cannot be named. "
            "Fix: splice into a timm ViT or ConvNet (models with forward_intermediates)."
        )
    return len(info)


def _module_name(info: Any) -> str:
    return info["module"] if isinstance(info, Mapping) else info.module


def hook_point(model: nn.Module, layer: int, final_norm: bool = False) -> tuple[str, nn.Module]:
    """The module whose output is the activation of ``layer`` (module docstring): ``(dotted name, module)``.

    Args:
        model: a timm ViT or ConvNet.
        layer: block (ViT) / ``feature_info`` (ConvNet) index; negative counts from the end.
        final_norm: the activations were taken after the model's final norm (a store of the last block: see
            :func:`mim.sae.splice_eval.store_site`); then the hook is on ``model.norm`` (ViT blocks) or ``model.norm_pre``
            (ConvNets whose final norm follows the last stage), when the model has one.

    Raises:
        ConfigError: no ``feature_info``, or ``layer`` out of range.
    """
    count = num_layers(model)
    if not -count <= layer < count:
        raise ConfigError(
            f"layer {layer} is out of range for a model with {count} blocks/stages. Fix: use a layer in "
            f"[{-count}, {count - 1}] (-1: last)."
        )
    name = _module_name(model.feature_info[layer % count])
    if final_norm:
        norm = "norm" if name.startswith("blocks") else "norm_pre"
        if isinstance(getattr(model, norm, None), nn.Module):
            name = norm
    return name, model.get_submodule(name)


class _Tokens:
    """The selected tokens of a module output as ``(N, d)`` rows, and the output rebuilt around new rows."""

    def __init__(self, out: Tensor, tokens: str, prefix: int, d_model: int | None) -> None:
        self.out, self.tokens, self.prefix = out, tokens, prefix
        if out.dim() == 3:  # (B, P + N, d) token sequence
            self.layout = "seq"
        elif out.dim() == 4 and (d_model is None or out.shape[1] == d_model):
            self.layout = "nchw"
        elif out.dim() == 4 and out.shape[-1] == d_model:
            self.layout = "nhwc"
        else:
            raise ConfigError(
                f"The hooked module returns a tensor of shape {tuple(out.shape)}, which is neither (B, tokens, d) "
                f"nor a (B, C, H, W) / (B, H, W, C) map of d = {d_model} channels. Fix: splice into a timm ViT block "
                "or ConvNet stage."
            )
        if tokens == "cls" and (self.layout != "seq" or prefix < 1):
            raise ConfigError("tokens 'cls' needs a ViT with a class token. Fix: use tokens 'patch'.")

    def rows(self) -> Tensor:
        out = self.out
        if self.layout == "seq":
            if self.tokens == "cls":
                return out[:, 0]
            return out[:, self.prefix :].reshape(-1, out.shape[-1])
        if self.layout == "nchw":
            return out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
        return out.reshape(-1, out.shape[-1])

    def rebuild(self, rows: Tensor) -> Tensor:
        out = self.out
        rows = rows.to(out.dtype)
        if self.layout == "seq":
            if self.tokens == "cls":
                return torch.cat([rows.unsqueeze(1), out[:, 1:]], dim=1)
            patch = rows.reshape(out.shape[0], out.shape[1] - self.prefix, out.shape[2])
            return torch.cat([out[:, : self.prefix], patch], dim=1)
        if self.layout == "nchw":
            b, c, h, w = out.shape
            return rows.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()
        return rows.reshape(out.shape)


def _check_tokens(tokens: str) -> None:
    if tokens not in SPLICE_TOKENS:
        raise ConfigError(f"tokens must be one of {list(SPLICE_TOKENS)}, got {tokens!r}.")


@contextmanager
def replace_tokens(
    model: nn.Module,
    layer: int,
    fn: TokenFn,
    final_norm: bool = False,
    tokens: str = "patch",
    d_model: int | None = None,
) -> Iterator[str]:
    """Within the block, every forward of ``model`` passes the ``tokens`` of ``layer``'s activation through ``fn``.

    The building block of :func:`splice`, :func:`intervene` and :func:`capture`: one forward hook on
    :func:`hook_point`'s module, removed on exit (also when the body raises).

    Args:
        model: a timm ViT or ConvNet.
        layer: block / stage index (:func:`hook_point`).
        fn: ``(N, d)`` rows (the module's dtype) -> ``(N, d)`` replacement rows (cast back to that dtype).
        final_norm: hook after the final norm (:func:`hook_point`).
        tokens: ``"patch"`` (prefix tokens pass unchanged) or ``"cls"`` (module docstring).
        d_model: the activation width (tells NCHW from NHWC maps); default: ``feature_info[layer]["num_chs"]``.

    Yields:
        The hooked module's dotted name.

    Raises:
        ConfigError: bad ``layer`` / ``tokens``; during a forward, an output that is not a token sequence or map.
    """
    _check_tokens(tokens)
    name, module = hook_point(model, layer, final_norm)
    if d_model is None:
        info = model.feature_info[layer % num_layers(model)]
        d_model = int(info["num_chs"] if isinstance(info, Mapping) else info.num_chs)
    prefix = int(getattr(model, "num_prefix_tokens", 0))

    def hook(_module: nn.Module, _args: Any, output: Any) -> Tensor:
        if not isinstance(output, Tensor):
            raise ConfigError(
                f"{name} returns {type(output).__name__}, not a tensor, so its activations cannot be replaced. "
                "Fix: splice into a timm ViT block or ConvNet stage."
            )
        view = _Tokens(output, tokens, prefix, d_model)
        return view.rebuild(fn(view.rows()))

    handle = module.register_forward_hook(hook)
    try:
        yield name
    finally:
        handle.remove()


@contextmanager
def capture(model: nn.Module, layer: int, final_norm: bool = False, tokens: str = "patch") -> Iterator[list[Tensor]]:
    """Record the ``tokens`` rows of ``layer`` on every forward (unchanged): yields a list that each forward
    appends one detached ``(N, d)`` tensor to (after any hook registered earlier on the same module)."""
    seen: list[Tensor] = []

    def record(rows: Tensor) -> Tensor:
        seen.append(rows.detach().clone())
        return rows

    with replace_tokens(model, layer, record, final_norm, tokens):
        yield seen


def _reconstruct(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    return sae.decode(sae.encode(x.float()))


def splice_fn(
    mode: str,
    sae: SparseAutoencoder | None = None,
    mean: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> TokenFn:
    """The row replacement of ``mode`` (:data:`SPLICE_MODES`, module docstring) as a function ``(N, d) -> (N, d)``.

    Args:
        mode: ``"recon"``, ``"zero"``, ``"mean"`` or ``"random"``.
        sae: any module with ``encode`` / ``decode`` (:class:`~mim.sae.variants.SparseAutoencoder`); needed by
            ``"recon"`` and ``"random"``; rows are encoded in float32.
        mean: ``(d,)`` activation mean, needed by ``"mean"``.
        generator: random stream of ``"random"`` (on the rows' device); default: torch's global one.

    Raises:
        ConfigError: an unknown mode, or a mode without what it needs.
    """
    if mode not in SPLICE_MODES:
        raise ConfigError(f"Unknown splice mode {mode!r}; valid: {', '.join(SPLICE_MODES)}.")
    if mode in ("recon", "random") and sae is None:
        raise ConfigError(f"Splice mode {mode!r} needs an SAE. Fix: pass sae=.")
    if mode == "mean" and mean is None:
        raise ConfigError("Splice mode 'mean' needs the activation mean. Fix: pass mean= (see mim.sae.splice_eval).")
    if mode == "recon":
        return lambda x: _reconstruct(sae, x)
    if mode == "zero":
        return torch.zeros_like
    if mode == "mean":
        return lambda x: mean.to(x.device, x.dtype).expand_as(x)

    def random_error(x: Tensor) -> Tensor:
        error = (x.float() - _reconstruct(sae, x)).norm(dim=1, keepdim=True)
        u = torch.randn(x.shape, device=x.device, dtype=torch.float32, generator=generator)
        return x.float() + error * u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)

    return random_error


@contextmanager
def splice(
    model: nn.Module,
    layer: int,
    sae: SparseAutoencoder | None = None,
    mode: str = "recon",
    mean: Tensor | None = None,
    final_norm: bool = False,
    tokens: str = "patch",
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Within the block, ``model``'s activations at ``layer`` are replaced as ``mode`` says (module docstring).

    ``with splice(vit, 6, sae): logits = vit(imgs)`` runs the encoder on the SAE reconstruction of block 6's
    patch tokens. Arguments as :func:`splice_fn` and :func:`replace_tokens`; yields the hooked module's name.

    Raises:
        ConfigError: see :func:`splice_fn` and :func:`replace_tokens`.
    """
    with replace_tokens(model, layer, splice_fn(mode, sae, mean, generator), final_norm, tokens) as name:
        yield name


def _latent_ids(ids: Iterable[int], d_sae: int, what: str) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < d_sae]
    if bad:
        raise ConfigError(f"{what} latent ids {bad} are outside [0, {d_sae}) of this SAE. Fix: pass ids below d_sae.")
    return ids


def edit_code(code: SparseCode, ablate: Iterable[int] = (), clamp: Mapping[int, float] | None = None) -> SparseCode:
    """``code`` with the ``ablate`` latents set to 0 and the ``clamp`` latents set to their value in every row
    (also rows where they were inactive), as a padded code (clamped latents appended as extra slots).

    Values are in the SAE's code units (those of ``sae.encode(x).values``).
    """
    clamp = dict(clamp or {})
    values, indices = code.values, code.indices
    drop = [*ablate, *clamp]
    if drop:
        values = values.masked_fill(torch.isin(indices, torch.tensor(drop, device=indices.device)), 0)
    if clamp:
        n = values.shape[0]
        ids = torch.tensor(list(clamp), device=indices.device, dtype=indices.dtype).expand(n, -1)
        vals = torch.tensor(list(clamp.values()), device=values.device, dtype=values.dtype).expand(n, -1)
        values, indices = torch.cat([values, vals], dim=1), torch.cat([indices, ids], dim=1)
    return SparseCode(values, indices)


def intervention_fn(
    sae: SparseAutoencoder, ablate: Iterable[int] = (), clamp: Mapping[int, float] | None = None,
    keep_error: bool = True,
) -> TokenFn:
    """The row edit of :func:`intervene` as a function ``(N, d) -> (N, d)``.

    With ``keep_error`` the result is ``x + (decode(f') - decode(f))`` = ``decode(f') + e`` (``f`` the code of
    ``x``, ``f'`` the edited code, ``e = x - decode(f)`` the SAE error); decoding is linear in the code, so the
    difference is decoded directly from ``f' - f`` (``W_dec^T (f' - f) / input_scale``, no ``b_dec``) and an empty
    edit adds exactly 0. Without ``keep_error`` it is ``decode(f')``.

    Raises:
        ConfigError: a latent id outside ``[0, d_sae)``, or a non-finite clamp value.
    """
    ablate = _latent_ids(ablate, sae.d_sae, "ablate")
    clamp = {int(k): float(v) for k, v in (clamp or {}).items()}
    _latent_ids(clamp, sae.d_sae, "clamp")
    bad = {k: v for k, v in clamp.items() if not torch.isfinite(torch.tensor(v))}
    if bad:
        raise ConfigError(f"clamp values must be finite, got {bad}.")

    def edit(x: Tensor) -> Tensor:
        code = sae.encode(x.float())
        edited = edit_code(code, ablate, clamp)
        if not keep_error:
            return sae.decode(edited)
        width = code.values.shape[1]
        delta = torch.cat([edited.values[:, :width] - code.values, edited.values[:, width:]], dim=1)
        change = sparse_decode(delta, edited.indices, sae.W_dec) / sae.input_scale
        return x.float() + change

    return edit


@contextmanager
def intervene(
    model: nn.Module,
    layer: int,
    sae: SparseAutoencoder,
    ablate: Iterable[int] = (),
    clamp: Mapping[int, float] | None = None,
    keep_error: bool = True,
    final_norm: bool = False,
    tokens: str = "patch",
) -> Iterator[str]:
    """Within the block, ``model``'s activations at ``layer`` are encoded with ``sae``, the ``ablate`` latents set
    to 0 and the ``clamp`` latents (``{id: value}``, code units) set to their value on every token, decoded, and
    (``keep_error``, the default) the SAE error term added back, so that with no edit the activations are
    unchanged bit for bit (:func:`intervention_fn`; SAELens ``use_error_term=True``). Without ``keep_error`` the
    edited reconstruction replaces the activations (error removed too).

    ``with intervene(vit, 6, sae, ablate=[123]): logits = head(vit(imgs))``. Other arguments as
    :func:`replace_tokens`; yields the hooked module's name.

    Raises:
        ConfigError: see :func:`intervention_fn` and :func:`replace_tokens`.
    """
    fn = intervention_fn(sae, ablate, clamp, keep_error)
    with replace_tokens(model, layer, fn, final_norm, tokens, d_model=sae.d_model) as name:
        yield name


@torch.no_grad()
def reference_tokens(model: nn.Module, layer: int, imgs: Tensor, final_norm: bool, tokens: str = "patch") -> Tensor:
    """The ``tokens`` rows of ``layer`` as the feature extractor stores them (timm ``forward_intermediates``,
    ``norm=final_norm``): ``(B * N, d)`` patch rows in image-major order, or ``(B, d)`` class tokens."""
    prefix = int(getattr(model, "num_prefix_tokens", 0))
    extra = {"return_prefix_tokens": True} if prefix else {}
    out = model.forward_intermediates(imgs, indices=[layer % num_layers(model)], norm=final_norm, stop_early=True,
                                      intermediates_only=True, **extra)[0]
    spatial, pre = out if prefix else (out, None)
    if tokens == "cls":
        return pre[:, 0]
    return spatial.flatten(2).transpose(1, 2).reshape(-1, spatial.shape[1])


@torch.no_grad()
def check_hook_point(
    model: nn.Module, layer: int, imgs: Tensor, final_norm: bool, tokens: str = "patch", rtol: float = 1e-4
) -> None:
    """Check on ``imgs`` that the rows :func:`replace_tokens` hands to its function are the features the extractor
    stores (:func:`reference_tokens`), up to ``rtol`` of their RMS (ViT, ResNet, ConvNeXt and most timm models
    pass; an architecture whose hooked module is not where timm takes its intermediates fails here, not silently).

    Raises:
        ConfigError: they differ (the module and the relative error named).
    """
    with capture(model, layer, final_norm, tokens) as seen:
        model.forward_features(imgs)
    want = reference_tokens(model, layer, imgs, final_norm, tokens).float()
    name = hook_point(model, layer, final_norm)[0]
    got = seen[0].float() if seen else None
    if got is None or got.shape != want.shape:
        shape = None if got is None else tuple(got.shape)
        raise ConfigError(
            f"Splicing at {name} gives rows of shape {shape}, the extracted features are {tuple(want.shape)}. "
            "Fix: splice into a timm ViT or ConvNet whose forward_features runs the hooked module."
        )
    scale = want.pow(2).mean().sqrt().clamp_min(1e-12)
    err = float((got - want).pow(2).mean().sqrt() / scale)
    if not err <= rtol:
        raise ConfigError(
            f"The activations at {name} differ from the features extracted at layer {layer} (relative RMS error "
            f"{err:.2e}): this architecture cannot be spliced at that layer. Fix: choose another layer or model."
        )


__all__ = [
    "SPLICE_MODES",
    "SPLICE_TOKENS",
    "capture",
    "check_hook_point",
    "edit_code",
    "hook_point",
    "intervene",
    "intervention_fn",
    "num_layers",
    "reference_tokens",
    "replace_tokens",
    "splice",
    "splice_fn",
]
