"""mim_rec: MIM (Multi-modal Content Interest Modeling, arXiv 2502.00321) on TorchRec."""

__version__ = "0.1.0"
