"""TorchX components for mim_rec's jobs; see :mod:`torchx_components.mim` and docs/torchx.md."""
