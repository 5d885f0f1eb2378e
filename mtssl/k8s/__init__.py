"""Kubernetes and Kubeflow: object builders, cluster profiles and `mtssl launch --k8s`."""

from mtssl import __version__

# The two images of images/ (retag with kustomize `images:` or --cpu-image/--gpu-image): the
# slim CPU one runs the coordinator, CPU workers and pipeline steps; the CUDA one GPU workers
# and GPU evaluation.
CPU_IMAGE = f"mtssl-cpu:{__version__}"
GPU_IMAGE = f"mtssl-cuda:{__version__}"
# The run layouts `mtssl launch --k8s --api` creates: Kubeflow Trainer v2 (a TrainJob and its
# TrainingRuntime) or Training Operator v1 (a Job and one PyTorchJob per task).
S3_SECRET = "mtssl-s3"  # default name of the Secret holding the S3 settings (mtssl.env.S3_VARS)
TRAINJOB, PYTORCHJOB = "trainjob", "pytorchjob"
APIS = (TRAINJOB, PYTORCHJOB)
