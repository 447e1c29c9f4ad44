"""Lightning callbacks of the pretraining runs: reconstruction pictures and encoder / SAE export."""

from mim.callbacks.export import ExportEncoder, ExportSAE
from mim.callbacks.reconstructions import ReconstructionImages

__all__ = ["ExportEncoder", "ExportSAE", "ReconstructionImages"]
