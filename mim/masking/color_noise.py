"""ColorMAE's data-independent masks from filtered ("coloured") noise.

Hinojosa, Liu, Ghanem, "ColorMAE: Exploring data-independent masking strategies in Masked
AutoEncoders", ECCV 2024, arXiv 2407.13036, Sec. 3 (mask generation); official code
``carlosh93/ColorMAE``, ``models/utils/masking_generator.py`` (``ColorMasking``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from mim.errors import ConfigError
from mim.masking.base import MaskGenerator, num_masked

COLORS = ("red", "blue", "green", "purple")


def color_transfer(color: str, freq_sq: torch.Tensor, sigma_small: float, sigma_large: float) -> torch.Tensor:
    """Frequency response of the filter that turns white noise ``W`` into ``color`` noise.

    With ``G_s`` a Gaussian blur of standard deviation ``s`` (in patches), whose response at spatial
    frequency ``f`` (cycles per patch) is ``exp(-2 pi^2 s^2 |f|^2)``, following ColorMAE Sec. 3:

    - red (low-pass): ``G_large * W``;
    - blue (high-pass): ``W - G_small * W``;
    - green (band-pass, difference of Gaussians): ``G_small * W - G_large * W``;
    - purple (band-stop): ``W - green``, which equals red + blue at these sigmas.

    Most frequency bins of a 2-D grid are high ones, so purple's power sits mostly in its high-pass
    part: its masks resemble blue ones, with green's band removed instead of the low frequencies.

    Args:
        color: one of :data:`COLORS`.
        freq_sq: squared frequency magnitudes ``|f|^2``, any shape.
        sigma_small, sigma_large: the two blur widths, ``0 < sigma_small < sigma_large``.

    Returns:
        The real response, same shape as ``freq_sq``.
    """
    small = torch.exp(-2.0 * math.pi**2 * sigma_small**2 * freq_sq)
    large = torch.exp(-2.0 * math.pi**2 * sigma_large**2 * freq_sq)
    return {"red": large, "blue": 1.0 - small, "green": small - large, "purple": 1.0 - small + large}[color]


def make_noise_bank(
    color: str, bank_size: int, side: int, seed: int, sigma_small: float, sigma_large: float
) -> torch.Tensor:
    """``(bank_size, side, side)`` float32 colour-noise maps on the CPU, a pure function of its arguments.

    White Gaussian noise from ``torch.Generator().manual_seed(seed)`` (the same white noise for
    every colour), filtered by :func:`color_transfer` as a circular convolution (FFT), then each
    map normalised to zero mean and unit variance. (The paper normalises the noise before
    thresholding; the official code divides each crop by its maximum. Neither changes which
    patches are masked, only the values :meth:`ColorNoiseMask.noise` returns.)
    """
    white = torch.randn(bank_size, side, side, generator=torch.Generator().manual_seed(seed))
    freq_sq = torch.fft.fftfreq(side).view(-1, 1) ** 2 + torch.fft.rfftfreq(side).view(1, -1) ** 2
    response = color_transfer(color, freq_sq, sigma_small, sigma_large)
    noise = torch.fft.irfft2(torch.fft.rfft2(white) * response, s=(side, side))
    noise = noise - noise.mean(dim=(1, 2), keepdim=True)
    return noise / noise.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)


def load_noise_bank(path: str) -> torch.Tensor:
    """ColorMAE's precomputed noise bank: the first array of the ``.npz`` at ``path`` (as the official
    ``ColorMasking.change_color_pattern`` reads it), as a ``(N, S, S')`` float32 CPU tensor.

    Raises:
        ConfigError: no such file, not a readable ``.npz``, or its first array is not a 3-D real array.
    """
    if not Path(path).is_file():
        raise ConfigError(
            f"ColorNoiseMask bank_file {path} does not exist. Fix: download the official bank (e.g. "
            "green_noise_data_3072.npz, linked from github.com/carlosh93/ColorMAE) or leave bank_file unset."
        )
    try:
        with np.load(path, allow_pickle=False) as archive:
            array = np.asarray(archive[archive.files[0]])
    except Exception as err:  # noqa: BLE001  (zip / format errors of many kinds)
        raise ConfigError(f"ColorNoiseMask cannot read bank_file {path} as an .npz archive: {err}") from err
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array) or 0 in array.shape:
        raise ConfigError(
            f"ColorNoiseMask bank_file {path}: the first array must be real with shape (N, S, S'), got "
            f"{array.dtype} {array.shape}. Fix: use the official ColorMAE .npz banks."
        )
    return torch.from_numpy(array.astype(np.float32))


class ColorNoiseMask(MaskGenerator):
    """Mask the lowest values of a random crop of a colour-noise map (ColorMAE).

    Per sample: pick a random map from a bank of ``bank_size`` noise maps of side ``bank_hw``
    (:func:`make_noise_bank`), take a random ``h x w`` crop with random horizontal and vertical
    flips, keep the ``L - num_masked(mask_ratio, L)`` highest values visible and mask the rest.
    "Highest visible" follows the official ``color_noise_mask`` (``argsort(descending=True)``,
    "keep stronger values from color noise pattern"). One bank pixel is one patch.

    Differences from the official code, on purpose:

    - by default the bank is generated here from ``seed`` (deterministic, no download); the authors'
      precomputed banks are used with ``bank_file`` (see below);
    - every sample draws its own bank entry, crop and flips from ``generator``; the official
      ``extract_windows`` applies one ``RandomCrop`` and one pair of flips to the whole bank, so a
      batch shares one crop window, and sample ``i`` always uses bank map ``i``;
    - the visible count is ``L - num_masked(mask_ratio, L)`` (the package contract) rather than
      ``int(L * (1 - mask_ratio))``; the two agree whenever ``mask_ratio * L`` is an integer.

    The filter forms are the paper's (Sec. 3, see :func:`color_transfer`). The defaults
    ``sigma_small=1``, ``sigma_large=2`` (in patches) are this package's choice: green's response
    then peaks at ``sqrt(ln 4 / (6 pi^2)) = 0.15`` cycles/patch (a period of about 6.5 patches,
    several blobs per 14x14 grid) and red's power response falls to half at 0.07 cycles/patch
    (blobs about as wide as a 14x14 grid). The sigmas behind the authors' precomputed banks could
    not be confirmed here.

    Sigmas and the grid: the sigmas are in patches, and a bank pixel is one patch on every grid. On
    ViT-B/16 at 224 px the crop is 14x14; on ViT-Tiny/4 at 32 px it is 8x8. To keep the blobs the same
    fraction of the image when going from 14x14 to 8x8, scale both sigmas by ``8 / 14`` (e.g. 1, 2 ->
    0.57, 1.14: green's peak frequency in cycles per patch rises by ``14 / 8``, so the number of blobs per
    image stays the same). Unscaled, an 8x8 crop shows ``(8 / 14)^2`` of the area a 14x14 crop shows:
    fewer, relatively larger blobs. Nothing is rescaled automatically, and the official banks (made
    for 14x14 crops) keep their pattern size in patches whatever the grid.

    Official banks (``bank_file``): the ``.npz`` files the official repository links (e.g.
    ``green_noise_data_3072.npz``), read as the official ``ColorMasking.change_color_pattern`` does:
    the archive's first array, shape ``(N, S, S')`` (N noise maps of ``S x S'`` pixels); its values are
    used as they are (the official per-crop division by the maximum does not change which patches are
    highest). ``color``, ``seed``, ``bank_size``, ``bank_hw`` and the sigmas are then not used for the
    noise; ``color`` should still name the file's colour (it is only logged).

    Args:
        mask_ratio: fraction of patches to mask, in (0, 1) (ColorMAE: 0.75, as MAE).
        color: ``"red"``, ``"blue"``, ``"green"`` (the paper's best, its default) or ``"purple"``.
        seed: seed of the bank's white noise; the same seed gives the same bank on every device.
        bank_size: number of noise maps in the bank.
        bank_hw: side of each map in patches; grids larger than this use a bank of side
            ``max(h, w)`` instead (built from the same seed).
        sigma_small, sigma_large: Gaussian blur widths in patches, ``0 < sigma_small < sigma_large``.
        bank_file: path of an official precomputed noise bank (``.npz``) used instead of generating one;
            ``None`` (default) generates it.

    Call: ``gen(batch_size, grid_hw, generator=None) -> (B, h*w) bool``, ``True`` = masked,
    row-major, on ``generator``'s device (CPU when ``None``); deterministic given a seeded
    generator, else drawn from the global torch RNG. Banks are built lazily and cached per
    (device, side) on the instance (4 MiB for the defaults); pickling drops the cache.

    Raises:
        ConfigError: unknown ``color``, ``mask_ratio`` outside (0, 1), ``bank_size``/``bank_hw`` < 1,
            or sigmas not ``0 < sigma_small < sigma_large``; a ``bank_file`` that does not exist, is not an
            ``.npz`` with a float array of shape ``(N, S, S')``, or (at call time) is smaller than the grid.
    """

    def __init__(
        self,
        mask_ratio: float,
        color: str = "green",
        seed: int = 0,
        bank_size: int = 256,
        bank_hw: int = 64,
        sigma_small: float = 1.0,
        sigma_large: float = 2.0,
        bank_file: str | None = None,
    ) -> None:
        super().__init__(mask_ratio)
        color = str(color).lower()
        if color not in COLORS:
            raise ConfigError(
                f"Unknown ColorNoiseMask color {color!r}. Fix: use one of {', '.join(COLORS)} "
                "(green, band-pass noise, is ColorMAE's best)."
            )
        if int(bank_size) < 1 or int(bank_hw) < 1:
            raise ConfigError(
                f"ColorNoiseMask needs bank_size >= 1 and bank_hw >= 1, got {bank_size} and {bank_hw}. "
                "Fix: leave them at their defaults (256 maps of 64x64)."
            )
        if not 0 < sigma_small < sigma_large:
            raise ConfigError(
                f"ColorNoiseMask needs 0 < sigma_small < sigma_large, got {sigma_small} and {sigma_large}. "
                "Fix: leave them at their defaults (1.0 and 2.0 patches)."
            )
        self.color, self.seed = color, int(seed)
        self.bank_size, self.bank_hw = int(bank_size), int(bank_hw)
        self.sigma_small, self.sigma_large = float(sigma_small), float(sigma_large)
        self.bank_file = None if bank_file is None else str(bank_file)
        self._banks: dict[tuple[str, int], torch.Tensor] = {}
        if self.bank_file is not None:
            self._banks[("cpu", -1)] = load_noise_bank(self.bank_file)  # checked now, not mid-training

    def bank(self, side: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """The ``(bank_size, side, side)`` float32 noise bank (default side ``bank_hw``), cached; with
        ``bank_file``, that file's ``(N, S, S')`` bank whatever ``side``."""
        device = torch.device("cpu") if device is None else torch.device(device)
        if self.bank_file is not None:
            key = (str(device), -1)
            if key not in self._banks:
                cpu = self._banks.get(("cpu", -1))
                self._banks[key] = (cpu if cpu is not None else load_noise_bank(self.bank_file)).to(device)
            return self._banks[key]
        side = self.bank_hw if side is None else int(side)
        key = (str(device), side)
        if key not in self._banks:
            bank = make_noise_bank(self.color, self.bank_size, side, self.seed, self.sigma_small, self.sigma_large)
            self._banks[key] = bank.to(device)
        return self._banks[key]

    def noise(
        self, batch_size: int, grid_hw: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(B, h, w)`` float32 noise crops, one random bank map, crop and flip pair per sample."""
        h, w = int(grid_hw[0]), int(grid_hw[1])
        device = generator.device if generator is not None else torch.device("cpu")
        bank = self.bank(max(self.bank_hw, h, w), device)
        count, side_h, side_w = bank.shape
        if h > side_h or w > side_w:
            raise ConfigError(
                f"the noise bank {self.bank_file} holds {side_h}x{side_w} maps, smaller than the {h}x{w} patch grid. "
                "Fix: a bank with larger maps, or leave bank_file unset to generate one."
            )
        u = torch.rand(5, batch_size, generator=generator, device=device)
        index = (u[0] * count).long().clamp_max(count - 1)
        top = (u[1] * (side_h - h + 1)).long().clamp_max(side_h - h)
        left = (u[2] * (side_w - w + 1)).long().clamp_max(side_w - w)
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        rows = top.view(-1, 1) + torch.where((u[3] < 0.5).view(-1, 1), rows.flip(0), rows)  # vertical flip
        cols = left.view(-1, 1) + torch.where((u[4] < 0.5).view(-1, 1), cols.flip(0), cols)  # horizontal flip
        return bank[index.view(-1, 1, 1), rows.view(batch_size, h, 1), cols.view(batch_size, 1, w)]

    def __call__(
        self, batch_size: int, grid_hw: tuple[int, int], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        length = int(grid_hw[0]) * int(grid_hw[1])
        values = self.noise(batch_size, grid_hw, generator).reshape(batch_size, length)
        masked_ids = values.topk(num_masked(self.mask_ratio, length), dim=1, largest=False).indices
        mask = torch.zeros(batch_size, length, dtype=torch.bool, device=values.device)
        return mask.scatter_(1, masked_ids, True)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_banks": {}}

    def __repr__(self) -> str:
        return (
            f"ColorNoiseMask(mask_ratio={self.mask_ratio}, color={self.color!r}, seed={self.seed}, "
            f"bank_size={self.bank_size}, bank_hw={self.bank_hw}, sigma_small={self.sigma_small}, "
            f"sigma_large={self.sigma_large}, bank_file={self.bank_file!r})"
        )
