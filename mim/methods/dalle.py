"""The encoder of DALL-E's discrete VAE, the tokenizer behind BEiT's and CAE's targets.

Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (arXiv 2102.12092), Sec. 2.1 and Appendix A.1: a
ResNet-style encoder maps a 256 px image to a 32x32 grid of logits over 8,192 codes (stride 8). BEiT
(arXiv 2106.08254, Sec. 2.2) and CAE (arXiv 2202.03026) feed it a 112 px second view of the 224 px crop
(bicubic / Lanczos resized), with ``map_pixels`` applied, and take the argmax per position: 14x14 tokens, one
per 16 px patch of the 224 px view.

:class:`DalleEncoder` is written here with the shapes and parameter names of the public ``dall-e`` package
(``dall_e/encoder.py``, ``dall_e/utils.py``: ``blocks.input.w``, ``blocks.group_1.block_1.res_path.conv_1.w``,
..., ``blocks.output.conv.b``), so the ``state_dict`` of its pickled ``encoder.pkl`` loads as is once converted
to safetensors (a one-time step the user runs, see :func:`load_dalle_encoder`). Nothing is downloaded here.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from mim.errors import ConfigError

#: ``dall_e.utils.logit_laplace_eps``: pixels are squeezed into ``[eps, 1 - eps]`` before the encoder.
LOGIT_LAPLACE_EPS = 0.1
#: Total stride of the encoder (three 2x max-pools).
DALLE_STRIDE = 8


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """``dall_e.map_pixels``: ``(1 - 2 eps) x + eps`` for pixels ``x`` in ``[0, 1]`` (any shape)."""
    return (1.0 - 2.0 * eps) * x + eps


class DalleConv2d(nn.Module):
    """``dall_e.utils.Conv2d``: a same-padded convolution with parameters named ``w`` ``(n_out, n_in, k, k)``
    and ``b`` ``(n_out,)``, computed in the input's dtype."""

    def __init__(self, n_in: int, n_out: int, kernel: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.empty(n_out, n_in, kernel, kernel))
        self.b = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.w, std=1.0 / (n_in * kernel * kernel) ** 0.5)
        self.padding = (kernel - 1) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w.to(x.dtype), self.b.to(x.dtype), padding=self.padding)


class DalleEncoderBlock(nn.Module):
    """``x -> id_path(x) + res_path(x) / n_layers**2``; ``res_path``: 4 x (ReLU, conv) with 3x3, 3x3, 3x3,
    1x1 kernels and a bottleneck of ``n_out / 4``; ``id_path``: a 1x1 conv when the width changes."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = DalleConv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        convs = [(n_in, hidden, 3), (hidden, hidden, 3), (hidden, hidden, 3), (hidden, n_out, 1)]
        layers: list[tuple[str, nn.Module]] = []
        for i, (cin, cout, k) in enumerate(convs, start=1):
            layers += [(f"relu_{i}", nn.ReLU()), (f"conv_{i}", DalleConv2d(cin, cout, k))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """DALL-E's dVAE encoder: ``(B, 3, H, W)`` float pixels after :func:`map_pixels` -> ``(B, vocab_size, H/8,
    W/8)`` logits (``H``, ``W`` multiples of 8).

    Args:
        n_hid: width of the first group (official 256); groups 1..4 have 1, 2, 4, 8 x ``n_hid`` channels.
        n_blk_per_group: residual blocks per group (official 2).
        vocab_size: number of codes (official 8192).
        group_count: groups (official 4: three of them end in a 2x max-pool).

    The defaults build the released encoder (about 54 M parameters). Smaller ``n_hid`` give the same
    structure for tests.
    """

    def __init__(self, n_hid: int = 256, n_blk_per_group: int = 2, vocab_size: int = 8192, group_count: int = 4) -> None:
        super().__init__()
        if group_count != 4:
            raise ConfigError(f"DALL-E's encoder has 4 groups, got group_count={group_count}.")
        n_layers = group_count * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]  # input, then the output of each group
        groups: list[tuple[str, nn.Module]] = [("input", DalleConv2d(3, n_hid, 7))]
        for g in range(1, group_count + 1):
            blocks: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", DalleEncoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers))
                for i in range(n_blk_per_group)
            ]
            if g < group_count:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g}", nn.Sequential(OrderedDict(blocks))))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", DalleConv2d(widths[-1], vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))
        self.vocab_size = vocab_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    @torch.no_grad()
    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` mapped pixels -> ``(B, H/8 * W/8)`` int64 code indices (argmax, row-major), as
        BEiT's / CAE's ``get_codebook_indices``."""
        return self(x.float()).argmax(dim=1).flatten(1)


def load_dalle_encoder(path: str) -> DalleEncoder:
    """A frozen :class:`DalleEncoder` in eval mode with the weights of the safetensors file ``path``.

    The width and vocabulary are read from the file (``blocks.input.w``: ``(n_hid, 3, 7, 7)``;
    ``blocks.output.conv.w``: ``(vocab, 8 n_hid, 1, 1)``). Make the file once from the public ``encoder.pkl``
    (``https://cdn.openai.com/dall-e/encoder.pkl``, which needs ``pip install DALL-E`` to unpickle)::

        import torch
        from safetensors.torch import save_file
        enc = torch.load("encoder.pkl", map_location="cpu", weights_only=False)
        save_file({k: v.float().contiguous() for k, v in enc.state_dict().items()}, "dalle_encoder.safetensors")

    Raises:
        ConfigError: no such file, or a ``state_dict`` that does not fit the encoder (missing / unexpected /
            misshaped weights).
    """
    if not Path(path).is_file():
        raise ConfigError(
            f"dalle_weights {path} does not exist. Fix: convert DALL-E's encoder.pkl once to safetensors "
            "(see mim.methods.dalle.load_dalle_encoder) and pass its path."
        )
    state = load_file(path)
    try:
        n_hid = state["blocks.input.w"].shape[0]
        vocab = state["blocks.output.conv.w"].shape[0]
        per_group = max(int(k.split(".")[2].split("_")[1]) for k in state if k.startswith("blocks.group_1.block_"))
        encoder = DalleEncoder(n_hid=n_hid, n_blk_per_group=per_group, vocab_size=vocab)
        encoder.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError, IndexError) as err:
        raise ConfigError(f"dalle_weights {path} is not a DALL-E dVAE encoder state_dict: {err}") from err
    return encoder.requires_grad_(False).eval()


__all__ = ["DALLE_STRIDE", "DalleEncoder", "LOGIT_LAPLACE_EPS", "load_dalle_encoder", "map_pixels"]
