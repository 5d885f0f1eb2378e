"""Multi-task self-supervised visual learning on one ResNet-v2 trunk."""

__version__ = "0.1.0"
