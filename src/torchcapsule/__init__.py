"""torchcapsule: one version-locked PyTorch+CUDA image and pipeline."""
__version__ = "0.1.0"
