"""Kubernetes and Kubeflow: object builders, cluster profiles and `mtssl launch --k8s`."""

from mtssl import __version__

IMAGE = f"mtssl:{__version__}"  # the Dockerfile's image; retag with kustomize `images:`
