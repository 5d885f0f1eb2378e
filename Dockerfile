# syntax=docker/dockerfile:1
# The runtime image of every stage: `mtssl` pre-training, coordinator, workers, the
# Kubernetes launcher and the Kubeflow pipeline steps. CUDA comes with the pinned torch wheel
# from PyPI (it pulls NVIDIA's CUDA 13 runtime wheels); GPU nodes need a driver that supports
# CUDA 13 and the NVIDIA container toolkit. The same image runs on CPU-only nodes.
#   docker build -t mtssl:0.1.0 .
FROM python:3.11.7-slim-bookworm

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# torch in a layer of its own: the largest and least often changed
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/mtssl
COPY pyproject.toml README.md ./
COPY mtssl ./mtssl
# exactly the README's install of the cluster image
RUN pip install '.[prep,s3,k8s,pipeline]'

RUN groupadd --gid 10001 mtssl \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mtssl --shell /usr/sbin/nologin mtssl
# numeric, so Kubernetes can check runAsNonRoot without reading /etc/passwd
USER 10001:10001
WORKDIR /home/mtssl
ENV HOME=/home/mtssl \
    MPLCONFIGDIR=/tmp/matplotlib
ENTRYPOINT ["mtssl"]
CMD ["--help"]
