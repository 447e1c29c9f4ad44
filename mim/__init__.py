"""mim: masked image modeling on timm backbones with PyTorch Lightning.

Jobs: pretrain (``mim fit``), evaluate (online probes, offline probe / fine-tune) and analyse
(feature stores and sparse autoencoders). See README.md.
"""

__version__ = "0.1.0"
