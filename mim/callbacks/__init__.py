"""Lightning callbacks of the pretraining runs: reconstruction pictures and encoder export."""

from mim.callbacks.export import ExportEncoder
from mim.callbacks.reconstructions import ReconstructionImages

__all__ = ["ExportEncoder", "ReconstructionImages"]
