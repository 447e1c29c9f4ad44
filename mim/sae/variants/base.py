"""The base every SAE variant shares: code and loss containers, the parameters, input normalisation, sparse
decoding, initialisation, dead-latent bookkeeping and the unit-norm decoder constraint (notation:
:mod:`mim.sae.variants`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mim.errors import ConfigError, UserError
from mim.sae.kernels import (
    LatentSort,
    Selector,
    attach_linear_grad,
    attach_linear_grad_ragged,
    linear_blocks,
    ragged_decode,
    ragged_offsets,
    select_linear,
    sparse_decode,
    threshold_linear,
)

#: the support searches of the threshold variants' sparse step (:meth:`SupportStep.init_support_search`)
SUPPORT_SEARCHES = ("auto", "compact", "rows")

#: rows per block of a fused dense step's backward (:func:`dense_encoder_grads`)
DENSE_BACKWARD_ROWS = 1024


class SparseCode(NamedTuple):
    """A batch of sparse codes in padded-row form.

    Attributes:
        values: (N, s) float; exactly 0 in unused slots; negative only for :class:`AbsTopKSAE`.
        indices: (N, s) int64 latent ids in ``[0, d_sae)``; an unused slot holds any valid id.
    """

    values: torch.Tensor
    indices: torch.Tensor

    def to_dense(self, d_sae: int) -> torch.Tensor:
        """The code as a dense (N, d_sae) tensor (repeated ids, as matching pursuit makes, add up)."""
        dense = self.values.new_zeros(self.values.shape[0], d_sae)
        return dense.scatter_add_(1, self.indices, self.values)

    def _distinct(self, d_sae: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-sorted ids with inactive slots as ``d_sae``, and the mask of each row's distinct active ids."""
        ids = self.indices.masked_fill(self.values == 0, d_sae).sort(dim=1).values
        first = torch.ones_like(ids, dtype=torch.bool)
        first[:, 1:] = ids[:, 1:] != ids[:, :-1]
        return ids, first & (ids < d_sae)

    def l0(self) -> torch.Tensor:
        """(N,) int64: active latents per row (a latent in several slots, as matching pursuit makes, counts once)."""
        return self._distinct(torch.iinfo(torch.long).max)[1].sum(dim=1)

    def fired(self, d_sae: int) -> torch.Tensor:
        """(d_sae,) int64: in how many rows each latent is active (no host-device sync)."""
        ids, keep = self._distinct(d_sae)
        counts = ids.new_zeros(d_sae + 1).index_add_(0, ids.reshape(-1), keep.reshape(-1).long())
        return counts[:d_sae]


class RaggedCode(NamedTuple):
    """A batch's sparse code with each row's own number of entries (the training steps of BatchTopK, ReLU and
    JumpReLU, whose rows differ widely in size: no padding to the widest row).

    Attributes:
        values: (nnz,) float.
        indices: (nnz,) int64 latent ids.
        rows: (nnz,) int64 row of each entry, sorted ascending.
        offsets: (N,) int64 start of each row's entries (``embedding_bag`` offsets).
    """

    values: torch.Tensor
    indices: torch.Tensor
    rows: torch.Tensor
    offsets: torch.Tensor

    def to_padded(self) -> SparseCode:
        """The same code as a :class:`SparseCode` padded to the widest row (reads that width: a sync)."""
        n, nnz = len(self.offsets), len(self.values)
        counts = torch.diff(self.offsets, append=self.offsets.new_tensor([nnz]))
        width = int(counts.max()) if n else 0
        slot = torch.arange(nnz, device=self.rows.device) - self.offsets[self.rows]
        values = self.values.new_zeros(n, width).index_put((self.rows, slot), self.values)
        indices = self.indices.new_zeros(n, width).index_put_((self.rows, slot), self.indices)
        return SparseCode(values, indices)


class SAEOutput(NamedTuple):
    """``x_hat`` (N, d_model) in the input's units and the ``code`` that made it."""

    x_hat: torch.Tensor
    code: SparseCode


class SAELoss(NamedTuple):
    """One training step's result (normalised units).

    Attributes:
        loss: scalar to minimise.
        terms: scalar parts for logging (``mse``, ``fvu``, ``auxk``, ``l1``, ``l0_penalty``, ...).
        x_hat: (N, d_model) reconstruction of ``x_n``.
        fired: (d_sae,) int64 tokens of the batch on which each latent was active.
        l0: scalar float, mean active latents per token.
    """

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    x_hat: torch.Tensor
    fired: torch.Tensor
    l0: torch.Tensor


def geometric_median(points: torch.Tensor, iterations: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Geometric median of ``points`` (n, d) by Weiszfeld's iterations (in float64), started at the mean.

    The point minimising the sum of Euclidean distances; what Gao et al. 2024 (App. A.1) initialise ``b_dec`` to.
    """
    pts = points.double()
    median = pts.mean(0)
    for _ in range(iterations):
        weights = 1.0 / (pts - median).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * pts).sum(0) / weights.sum()
        if (new - median).norm() <= 1e-7 * median.norm().clamp_min(1.0):
            median = new
            break
        median = new
    return median.to(points.dtype)


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``E ||x - x_hat||^2`` over a batch (N, d): squared error summed over dimensions, mean over rows (one fused
    ``mse_loss`` pass each way: a chain of elementwise ops cost 1.6 ms more, forward and backward, at (4096, 192)
    on 2 CPU cores)."""
    return F.mse_loss(x_hat, x.to(x_hat.dtype), reduction="sum") / x.shape[0]


def batch_variance(x: torch.Tensor) -> torch.Tensor:
    """``sum ||x - mean(x)||^2 / N`` over a batch (N, d): the total variance around the per-dimension mean.

    Under DDP (an initialised process group of more than one rank) the batch is that of all ranks together
    (counts, sums and sums of squares all-reduced in float64, no gradient: ``x`` is data or a detached
    residual), so every rank normalises its loss alike and 2 ranks of ``B`` rows take the step of one process
    of ``2B``. Every rank must then call it equally often (a collective).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return (x - x.mean(0)).pow(2).sum(-1).mean()
    with torch.no_grad():
        x64 = x.detach().double()
        stats = torch.cat([x64.sum(0), x64.pow(2).sum().view(1), x64.new_tensor([x.shape[0]])])
        dist.all_reduce(stats)
        count = stats[-1].clamp_min(1)
        mean = stats[:-2] / count
        return (stats[-2] / count - mean.pow(2).sum()).clamp_min(0).to(x.dtype)


def support_code(f: torch.Tensor, support: torch.Tensor, width: int | None = None) -> SparseCode:
    """Padded code of the entries of ``f`` (N, d_sae) where ``support`` (N, d_sae) bool is set (``s`` = ``width``,
    by default the largest row count, read from the device); values are ``f`` there (zeros allowed), gradients
    flow to ``f`` at every support entry."""
    if width is None:
        width = int(support.sum(1).max()) if support.numel() else 0
    indices = support.to(f.dtype).topk(width, dim=1, sorted=False).indices
    return SparseCode(f.gather(1, indices) * support.gather(1, indices), indices)


def host_ints(*values: torch.Tensor) -> list[int]:
    """Scalar tensors as Python ints, read in one transfer: the one host-device sync a training step may make
    (free on the CPU)."""
    return torch.stack([v.reshape(()).long() for v in values]).tolist()


def column_counts(mask: torch.Tensor) -> torch.Tensor:
    """(M,) int64: the ``True`` (non-zero) entries in each column of a ``mask`` (N, M), exactly.

    Sums of 255-row blocks in ``uint8`` (at most 255 each, so no overflow), added up in int64. ``mask.sum(0)``
    first casts the whole map to int64: on 2 CPU cores 72 ms for a (4096, 3072) map, against 0.6 ms here.
    """
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.device.type != "cpu":  # the cast is on the fly there
        return mask.sum(0)
    rows = mask.view(torch.uint8)
    counts = torch.zeros(rows.shape[1], dtype=torch.long, device=rows.device)
    for start in range(0, len(rows), 255):
        counts += rows[start : start + 255].sum(0, dtype=torch.uint8)
    return counts


def zero_where_inactive_(grad: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """``grad`` (N, d_sae) set to 0 in place where the code ``f >= 0`` (same shape) is 0: the derivative of ReLU (and
    of JumpReLU, whose ``f`` is 0 exactly below its positive threshold) as autograd applies it (0 at ``z = 0``).

    ATen's ``threshold_backward`` written into ``grad`` itself: 3 ms for a (4096, 3072) map on 2 CPU cores, where
    ``masked_fill_`` takes 26 ms and ``mul_`` by the bool map first casts it to a fresh float map.
    """
    return torch.ops.aten.threshold_backward.grad_input(grad, f, 0.0, grad_input=grad)


def dense_encoder_grads(grad_x_hat: torch.Tensor, W_dec: torch.Tensor, bias: torch.Tensor | None, f: torch.Tensor,
                        x_c: torch.Tensor, W_enc: torch.Tensor, need_x: bool, need_W_enc: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """The encoder's gradients in a fused dense step's backward (ReLU + L1, JumpReLU), from
    ``dz = (dx_hat W_dec^T + bias) * (f > 0)`` (N, d_sae) with ``f >= 0`` the step's code: ``(dx, dW_enc, db_enc)``,
    ``dx = dz W_enc`` (N, d) only if ``need_x``, ``dW_enc = dz^T x_c`` (d_sae, d) only if ``need_W_enc``, else
    ``None``. ``dz`` is made :data:`DENSE_BACKWARD_ROWS` rows at a time through one reused buffer
    (:func:`~mim.sae.kernels.linear_blocks`), masked in place (:func:`zero_where_inactive_`) and added into
    ``dW_enc``: on the CPU a fresh (N, d_sae) map is page-faulted in at every step. ``grad_x_hat`` contiguous."""
    grad_x = x_c.new_empty(x_c.shape) if need_x else None
    grad_W_enc = W_enc.new_zeros(W_enc.shape) if need_W_enc else None
    grad_b_enc = W_enc.new_zeros(W_enc.shape[0])
    for start, block in linear_blocks(grad_x_hat, W_dec, bias, DENSE_BACKWARD_ROWS):
        stop = start + len(block)
        grad_z = zero_where_inactive_(block, f[start:stop])
        grad_b_enc += grad_z.sum(0)
        if need_x:
            torch.mm(grad_z, W_enc, out=grad_x[start:stop])
        if need_W_enc:
            grad_W_enc.addmm_(grad_z.t(), x_c[start:stop])
    return grad_x, grad_W_enc, grad_b_enc


def threshold_code(z: torch.Tensor, threshold: torch.Tensor | float) -> SparseCode:
    """The code ``z * (z > threshold)`` in padded form, gradients to ``z`` at the active entries."""
    return support_code(z, z.detach() > threshold)


def _check(ok: bool, name: str, value: Any, rule: str, fix: str) -> None:
    """Raise :class:`ConfigError` "``name`` must ``rule``, got ``value``. Fix: ``fix``", naming the SAE config key
    (``--model.init_args.sae.init_args.<name>``) unless ``ok``. Comparisons with NaN are false, so NaN fails."""
    if not ok:
        raise ConfigError(
            f"SAE {name} must {rule}, got {value!r}. Fix: {fix} (--model.init_args.sae.init_args.{name})."
        )


def _check_positive(name: str, value: float, integer: bool = False) -> None:
    """``value > 0`` (``>= 1`` for counts) or :class:`ConfigError`."""
    if integer:
        _check(value >= 1, name, value, "be positive (an integer >= 1)", f"set {name} to a positive integer")
    else:
        _check(value > 0, name, value, "be positive (> 0)", f"set {name} to a positive number")


def _check_non_negative(name: str, value: float) -> None:
    """``value >= 0`` or :class:`ConfigError`."""
    _check(value >= 0, name, value, "be >= 0", f"set {name} >= 0 (0 turns the term off)")


def _check_fraction(name: str, value: float) -> None:
    """``0 < value <= 1`` or :class:`ConfigError`."""
    _check(0 < value <= 1, name, value, "lie in (0, 1]", f"set {name} to e.g. 0.2")


def _without_autocast(device: torch.device) -> Any:
    """A context in which autocast is off on ``device`` (ops run in their inputs' dtype)."""
    return torch.autocast(device.type, enabled=False)


class SparseAutoencoder(nn.Module):
    """Base of every variant: parameters, normalisation, decoding, initialisation and the decoder constraint.

    A variant implements :meth:`code` (the inference code of normalised inputs) and :meth:`loss` (a training
    step). Public methods take raw features (the store's units) unless their name says ``_n``.

    Args:
        d_model: input width ``d`` (must equal the feature store's).
        d_sae: number of latents (dictionary size).
        dead_tokens: a latent is dead after this many training tokens without firing (Gao et al. 2024,
            Sec. 2.4: 10M tokens).

    Mixed precision (``--trainer.precision bf16-mixed`` / ``16-mixed``): parameters and buffers stay float32;
    under autocast the encoder matmul runs in the autocast dtype for the ranking variants (TopK, AbsTopK,
    TopAFA, MP, ReLU: a rounded ``z`` changes which latents win only at near-ties), but in float32 wherever ``z``
    is compared with a learned or estimated threshold (BatchTopK / Matryoshka, with their AuxK candidates
    from the same pass, and JumpReLU: see :meth:`pre_acts` and :meth:`select_pre_acts`). Matching pursuit only
    chooses atoms with the autocast matmul; its coefficients are float32 dot products with the chosen atoms.
    Decoding (:func:`~mim.sae.kernels.sparse_decode`) and the losses run in float32.

    Host-device syncs in a training step: none for TopK / AbsTopK / TopAFA / MP; one read of a few integers
    for BatchTopK / Matryoshka / ReLU / JumpReLU (the exactness check of their sparse selection and the code
    width), more only in their exact fallbacks.

    Raises:
        ConfigError: a ``d_model``, ``d_sae`` or ``dead_tokens`` below 1.
    """

    #: decoder rows kept at unit norm, the gradient's parallel component removed (Gao et al. App. A.1)
    unit_norm_decoder: ClassVar[bool] = True
    #: whether the variant has its own encoder (matching pursuit uses the decoder)
    has_encoder: ClassVar[bool] = True
    #: whether a code row never holds a latent twice (matching pursuit may pick an atom again)
    distinct_ids: ClassVar[bool] = True

    def __init__(self, d_model: int, d_sae: int, dead_tokens: int = 10_000_000) -> None:
        super().__init__()
        for name, value in (("d_model", d_model), ("d_sae", d_sae), ("dead_tokens", dead_tokens)):
            _check_positive(name, value, integer=True)
        self.d_model, self.d_sae, self.dead_tokens = d_model, d_sae, dead_tokens
        self.W_dec = nn.Parameter(torch.empty(d_sae, d_model))
        self.b_dec = nn.Parameter(torch.zeros(d_model))
        if self.has_encoder:
            self.W_enc = nn.Parameter(torch.empty(d_sae, d_model))
            self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.long))
        self.reset_parameters()

    # ----------------------------------------------------------------------------------------------- set-up
    def init_args(self) -> dict[str, Any]:
        """The constructor arguments (what :func:`save_sae` writes to the JSON config)."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def decoder_init_norm(self) -> float:
        """Norm of the decoder rows at initialisation (1 for unit-norm variants)."""
        return 1.0

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random unit directions for the decoder rows (scaled to :meth:`decoder_init_norm`), the encoder as
        their transpose, zero biases, scale 1. Data-dependent parts come from :meth:`initialize`."""
        nn.init.kaiming_uniform_(self.W_dec, a=math.sqrt(5))
        self.W_dec.mul_(self.decoder_init_norm() / self.W_dec.norm(dim=1, keepdim=True))
        self.b_dec.zero_()
        if self.has_encoder:
            self.W_enc.copy_(self.W_dec)
            self.b_enc.zero_()

    @torch.no_grad()
    def initialize(self, sample: torch.Tensor) -> None:
        """Fit the input scale (``E||x_n|| = sqrt(d_model)``) and ``b_dec`` (geometric median of the normalised
        sample) on ``sample`` (n, d_model) raw features; marks the SAE initialised.

        Raises:
            UserError: a sample with another width, or non-finite values.
        """
        sample = sample.detach().float().to(self.b_dec.device)
        if sample.ndim != 2 or sample.shape[1] != self.d_model or not len(sample):
            raise UserError(f"SAE initialisation needs a (n, {self.d_model}) sample, got {tuple(sample.shape)}.")
        if not torch.isfinite(sample).all():
            raise UserError("The SAE initialisation sample holds NaN/Inf features. Fix: re-extract the store.")
        mean_norm = sample.norm(dim=1).mean()
        self.input_scale.fill_(math.sqrt(self.d_model) / float(mean_norm.clamp_min(1e-12)))
        self.b_dec.copy_(geometric_median(sample * self.input_scale))
        self.initialized.fill_(True)

    # ------------------------------------------------------------------------------------------- inference
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Raw features (N, d_model) -> the normalised ``x_n`` the SAE works on."""
        return x.to(self.b_dec.dtype) * self.input_scale

    def pre_acts(self, x_n: torch.Tensor, fp32: bool = False) -> torch.Tensor:
        """Dense pre-activations ``z = W_enc (x_n - b_dec) + b_enc``: (N, d_sae).

        Under autocast the matmul runs in the autocast dtype (bf16 / fp16), unless ``fp32``: then autocast is
        off and ``z`` is float32. The threshold variants need that: bf16 keeps 8 significant bits, so near
        ``z = 0.7`` its values are 0.0039 apart, wider than JumpReLU's whole pseudo-derivative window
        (bandwidth 0.001), which then holds no ``z`` and gives the threshold no gradient; and a threshold
        estimated from, or compared with, rounded ``z`` is off by up to 0.4 %.
        """
        with self.encoder_args(x_n, fp32) as (x, W, b, c):
            return F.linear(x - c, W, b)

    @contextlib.contextmanager
    def encoder_args(self, x_n: torch.Tensor, fp32: bool) -> Iterator[tuple[torch.Tensor, ...]]:
        """``(x_n, W_enc, b_enc, b_dec)`` for an encoder pass: as they are, or with ``fp32`` cast to float32 and
        autocast off on their device for the pass (the precision :meth:`pre_acts` explains)."""
        if not fp32:
            yield x_n, self.W_enc, self.b_enc, self.b_dec
            return
        with _without_autocast(x_n.device):
            yield x_n.float(), self.W_enc.float(), self.b_enc.float(), self.b_dec.float()

    def select_pre_acts(self, x_n: torch.Tensor, select: Selector, fp32: bool = False,
                        sort: LatentSort | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The entries ``select`` picks of the pre-activations ``z`` (:meth:`pre_acts`), computed blockwise with a
        sparse backward (:func:`~mim.sae.kernels.select_linear`): ``values`` (N, s) and ``indices`` (N, s) int64.
        With ``fp32`` autocast is off and ``values`` are float32 (as :meth:`pre_acts`). ``sort``: a
        :class:`~mim.sae.kernels.LatentSort` shared with :meth:`decode_n` of the same code."""
        with self.encoder_args(x_n, fp32) as (x, W, b, c):
            return select_linear(x, W, b, select, center=c, sort=sort)

    def attach_pre_acts(self, x_n: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                        fp32: bool = False) -> torch.Tensor:
        """``values`` (N, s) = ``z.gather(1, indices)`` from a no-grad :meth:`select_pre_acts`, made differentiable
        with the sparse backward over these entries only (:func:`~mim.sae.kernels.attach_linear_grad`)."""
        with self.encoder_args(x_n, fp32) as (x, W, b, c):
            return attach_linear_grad(x, W, b, values, indices, center=c)

    def attach_ragged(self, x_n: torch.Tensor, code: RaggedCode, fp32: bool = False,
                      sort: LatentSort | None = None) -> torch.Tensor:
        """The (nnz,) pre-activations ``code.values`` (computed without autograd) made differentiable with the
        sparse backward over the code's entries (:func:`~mim.sae.kernels.attach_linear_grad_ragged`; ``sort`` as
        :meth:`select_pre_acts`)."""
        with self.encoder_args(x_n, fp32) as (x, W, b, c):
            return attach_linear_grad_ragged(x, W, b, code.values, code.indices, code.rows, code.offsets, center=c,
                                             sort=sort)

    def code(self, x_n: torch.Tensor) -> SparseCode:
        """The inference code of normalised inputs ``x_n`` (N, d_model)."""
        raise NotImplementedError

    def decode_n(self, code: SparseCode | RaggedCode, sort: LatentSort | None = None) -> torch.Tensor:
        """``x_hat_n = W_dec^T f + b_dec`` (normalised units), decoding only the active latents (``sort``: the
        :class:`~mim.sae.kernels.LatentSort` the encoder's kernel of the same code was given, or ``None``)."""
        if isinstance(code, RaggedCode):
            return ragged_decode(code.values, code.indices, code.offsets, self.W_dec, sort) + self.b_dec
        return sparse_decode(code.values, code.indices, self.W_dec, sort) + self.b_dec

    def encode(self, x: torch.Tensor) -> SparseCode:
        """Sparse codes of raw features ``x`` (N, d_model)."""
        return self.code(self.normalize(x))

    def decode(self, code: SparseCode) -> torch.Tensor:
        """Reconstruction (N, d_model) in the raw features' units."""
        return self.decode_n(code) / self.input_scale

    def forward(self, x: torch.Tensor) -> SAEOutput:
        """Encode and decode raw features ``x`` (N, d_model)."""
        code = self.encode(x)
        return SAEOutput(self.decode(code), code)

    # -------------------------------------------------------------------------------------------- training
    def loss(self, x_n: torch.Tensor) -> SAELoss:
        """One training step's loss on normalised inputs ``x_n`` (N, d_model)."""
        raise NotImplementedError

    def dense_step_result(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], x_hat: torch.Tensor,
                          f: torch.Tensor) -> SAELoss:
        """The :class:`SAELoss` of a dense step: ``f`` (N, d_sae) the dense code (firing where non-zero), or the
        firing counts (d_sae,) int64 a fused step already took."""
        fired = column_counts(f.detach()) if f.ndim == 2 else f
        return SAELoss(loss, terms, x_hat, fired, fired.sum().float() / max(len(x_hat), 1))

    def dense_decode_n(self, f: torch.Tensor) -> torch.Tensor:
        """``x_hat_n = f W_dec + b_dec`` of a dense code ``f`` (N, d_sae) by one matmul, in float32 also under
        autocast (the dense step of the penalised variants while their code is dense)."""
        with _without_autocast(f.device):
            return f.float() @ self.W_dec.float() + self.b_dec.float()

    def _result(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], x_hat: torch.Tensor,
                code: SparseCode | RaggedCode) -> SAELoss:
        """The :class:`SAELoss` of a step (``terms`` must hold ``mse``), with the firing counts of ``code``."""
        if isinstance(code, RaggedCode):  # distinct ids per row
            active = (code.values != 0).long()
            fired = active.new_zeros(self.d_sae).index_add_(0, code.indices, active)
            l0 = active.new_zeros(len(code.offsets)).index_add_(0, code.rows, active)
        elif self.distinct_ids:  # no id twice in a row: count active slots directly (no sort, no sync)
            active = (code.values != 0).long()
            fired = active.new_zeros(self.d_sae).index_add_(0, code.indices.reshape(-1), active.reshape(-1))
            l0 = active.sum(1)
        else:
            fired, l0 = code.fired(self.d_sae), code.l0()
        return SAELoss(loss, terms, x_hat, fired, l0.float().mean())

    def dead_latents(self) -> torch.Tensor:
        """(d_sae,) bool: latents that have not fired for ``dead_tokens`` training tokens."""
        return self.tokens_since_fired >= self.dead_tokens

    @torch.no_grad()
    def update_firing(self, fired: torch.Tensor, tokens: int) -> None:
        """Dead-latent bookkeeping after a step: ``fired`` (d_sae,) counts over ``tokens`` tokens (all ranks)."""
        self.tokens_since_fired.add_(tokens).masked_fill_(fired > 0, 0)

    @torch.no_grad()
    def remove_parallel_grad_(self) -> None:
        """Drop the component of each decoder row's gradient parallel to the row (call before the optimizer
        step; with :meth:`normalize_decoder_` after it, the unit-norm constraint of Gao et al. App. A.1)."""
        if self.unit_norm_decoder and self.W_dec.grad is not None:
            W, grad = self.W_dec, self.W_dec.grad  # grad -= (grad . W_j / ||W_j||^2) W_j: three passes, no temporaries
            coef = torch.linalg.vecdot(grad, W) / torch.linalg.vecdot(W, W).clamp_min(1e-24)
            grad.addcmul_(W, coef.unsqueeze(1), value=-1.0)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Project the decoder rows back to unit norm (after the optimizer step)."""
        if self.unit_norm_decoder:
            self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))


def warmup_scale(step: torch.Tensor, warmup_steps: int) -> torch.Tensor | float:
    """``min(1, (step + 1) / warmup_steps)`` on the device (no sync), 1 without a warm-up."""
    if not warmup_steps:
        return 1.0
    return ((step + 1).float() / warmup_steps).clamp_max(1.0)


class SupportStep:
    """Mixin of the threshold variants' exact sparse training step (:class:`~mim.sae.variants.ReLUSAE`,
    :class:`~mim.sae.variants.JumpReLUSAE`): the support ``{z > offset - margin}`` as a :class:`RaggedCode`.

    The encoder pass (:func:`~mim.sae.kernels.select_linear`, no autograd) keeps each row's ``w`` largest
    ``z - offset``. A row whose ``w``-th candidate is still in the support may hold more entries (all others are
    at most that candidate): those rows, found on the device, are recomputed in full (the exact per-row
    fallback). The kept entries then get the sparse backward (:meth:`SparseAutoencoder.attach_ragged`). ``w``
    follows the data: ``3 x`` the last step's mean support count plus 16; while that exceeds
    ``sparse_max_fraction * d_sae`` (early in training: half the entries are positive at initialisation) the
    variant runs its dense step, which is faster there. One read of three integers per step (one sync on an
    accelerator), one more when a row needs the fallback. On the CPU the support is compacted block by block
    instead (:attr:`support_search`): the same entries, no fallback.
    """

    d_sae: int
    sparse_max_fraction: float
    #: How the sparse step finds the support (:meth:`init_support_search`).
    support_search = "auto"

    def init_support_search(self, support_search: str) -> None:
        """Set :attr:`support_search` after checking it: ``"compact"`` compares each block of ``z`` with the cut
        and compacts the hits (:func:`~mim.sae.kernels.threshold_linear`; one host read per block, which costs
        nothing on the CPU), ``"rows"`` keeps each row's ``width`` largest entries with the exact fallback (no
        per-block sync: for accelerators); ``"auto"``: ``"compact"`` on the CPU, else ``"rows"``. Both give the
        same entries. On 2 CPU cores at d 192, d_sae 3072, 4096 tokens, about 32 entries per row: 2.8 ms of
        compaction per 1024-row block against 13.7 ms for its ``topk(width)`` (a ``width`` above ``d_sae / 64``
        takes ``topk``'s full-selection path).

        Raises:
            ConfigError: another value.
        """
        _check(support_search in SUPPORT_SEARCHES, "support_search", support_search,
               f"be one of {SUPPORT_SEARCHES}", 'set support_search to "auto" (the faster search for the device)')
        self.support_search = support_search

    def sparse_width(self) -> int | None:
        """Candidates per row of the next sparse step, or ``None`` (run the dense step)."""
        width = getattr(self, "_support_width", None)
        return None if width is None or width > self.sparse_max_fraction * self.d_sae else width

    def fused_dense_step(self, x_n: torch.Tensor) -> bool:
        """Whether the dense step can run fused (the variant's own autograd Function): autocast off on ``x_n``'s
        device and ``x_n`` in the encoder's dtype; under autocast the dense step runs through autograd."""
        return not torch.is_autocast_enabled(x_n.device.type) and x_n.dtype == self.W_enc.dtype

    def note_support(self, mean_count: float) -> None:
        """Record a step's mean support entries per row (sets the next step's width)."""
        self._support_width = min(self.d_sae, math.ceil(3 * mean_count) + 16)

    @torch.no_grad()
    def support_entries(self, x_n: torch.Tensor, offset: torch.Tensor | None, margin: float, fp32: bool,
                        width: int, dead: torch.Tensor) -> tuple[RaggedCode, int]:
        """The support ``z > offset - margin`` (``offset`` (d_sae,) or ``None`` for 0) of every row, exactly.

        Returns:
            the entries as a :class:`RaggedCode` of ``z`` values without gradient (pass it to
            :meth:`SparseAutoencoder.attach_ragged`), and the number of ``dead`` latents (read in the same sync).
        """
        off = None if offset is None else offset.detach()
        n = len(x_n)
        if self.support_search == "compact" or (self.support_search == "auto" and x_n.device.type == "cpu"):
            with self.encoder_args(x_n, fp32) as (x, W, b, c):
                rows, cols, vals = threshold_linear(x, W, b, -margin if off is None else off - margin, strict=True,
                                                    center=c)[:3]
            self.last_fallback = False
            self.note_support(len(rows) / max(n, 1))
            return RaggedCode(vals, cols, rows, ragged_offsets(rows, n)), int(dead.sum())

        def select(z: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
            if off is None:
                return z.topk(width, dim=1, sorted=False)
            return (z - off).topk(width, dim=1, sorted=False).indices

        values, indices = self.select_pre_acts(x_n, select, fp32)
        inside = values > (-margin if off is None else off[indices] - margin)
        over = inside.all(1) if width < self.d_sae else torch.zeros(n, dtype=torch.bool, device=values.device)
        inside &= ~over[:, None]
        nnz, n_over, n_dead = host_ints(inside.sum(), over.sum(), dead.sum())
        rows, slots = torch.nonzero_static(inside, size=nnz).unbind(1)
        cols, vals = indices[rows, slots], values[rows, slots]
        self.last_fallback = n_over > 0
        if n_over:  # rows that may hold more than `width` entries: their whole pre-activation rows
            rows_o = torch.nonzero_static(over, size=n_over).squeeze(1)
            z = self.pre_acts(x_n[rows_o], fp32)
            r, c = (z > (-margin if off is None else off - margin)).nonzero(as_tuple=True)
            rows, cols, vals = torch.cat([rows, rows_o[r]]), torch.cat([cols, c]), torch.cat([vals, z[r, c].to(vals.dtype)])
            order = rows.argsort(stable=True)
            rows, cols, vals = rows[order], cols[order], vals[order]
        self.note_support(len(rows) / max(n, 1))
        return RaggedCode(vals, cols, rows, ragged_offsets(rows, n)), n_dead

    def dead_pre_act_loss(self, x_n: torch.Tensor, dead: torch.Tensor, n_dead: int,
                          threshold: torch.Tensor | None, fp32: bool) -> torch.Tensor:
        """SAELens' pre-activation loss on dead latents (``calculate_pre_act_loss`` in
        ``sae_lens/saes/jumprelu_sae.py``, Anthropic's pre-activation loss restricted to dead latents):
        ``E_n sum_{j dead} ReLU(theta_j - z_nj) ||W_dec,j||`` (``threshold`` (d_sae,) or ``None`` for 0), which
        pulls the dead latents' pre-activations up to their threshold. Computed on the ``n_dead`` dead latents'
        columns only (``n_dead`` = ``dead.sum()``, read by the caller's one sync), a scalar 0 when none is dead."""
        if n_dead == 0:
            return x_n.new_zeros((), dtype=torch.float32)
        ids = torch.nonzero_static(dead, size=n_dead).squeeze(1)
        with self.encoder_args(x_n, fp32) as (x, W, b, c):
            z = F.linear(x - c, W[ids], b[ids])
        below = F.relu((0.0 if threshold is None else threshold[ids]) - z.float())
        return (below * self.W_dec[ids].norm(dim=1)).sum(1).mean()

    def penalised_result(self, x_n: torch.Tensor, x_hat: torch.Tensor, penalty_name: str, penalty: torch.Tensor,
                         coeff: float, warmup_steps: int, pre_act: Callable[[], torch.Tensor],
                         dense: torch.Tensor | None, code: RaggedCode | None) -> SAELoss:
        """The threshold variants' loss: ``mse + w * coeff * penalty`` (``w``: :func:`warmup_scale` of the
        ``step`` buffer), plus ``pre_act_coeff * pre_act()`` (:meth:`dead_pre_act_loss`) when that is on; in
        training it advances ``step``. ``dense``: the dense step's (N, d_sae) code or its firing counts (d_sae,),
        else ``None`` and ``code`` the sparse step's entries. Logged terms: ``mse``, ``penalty_name``, ``pre_act``."""
        mse = squared_error(x_n, x_hat)
        loss = mse + warmup_scale(self.step, warmup_steps) * coeff * penalty
        terms = {"mse": mse, penalty_name: penalty}
        if self.pre_act_coeff > 0:
            terms["pre_act"] = pre_act()
            loss = loss + self.pre_act_coeff * terms["pre_act"]
        if self.training:
            self.step.add_(1)
        if dense is not None:
            return self.dense_step_result(loss, terms, x_hat, dense)
        return self._result(loss, terms, x_hat, code)
