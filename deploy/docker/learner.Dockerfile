# convoy learner, driver and replay-shard image: the head node of a `ray up` cluster, the
# KubeRay head group and the Redis shard StatefulSet all run it.
#
#   docker build -f deploy/docker/learner.Dockerfile -t REGISTRY/convoy/learner:0.1.0 .
#
# torch 2.13.0 comes as the CUDA 12.8 build from the PyTorch cu128 index (needs an NVIDIA
# driver >= 525 through CUDA 12 minor-version compatibility; >= 570 for full 12.8 features).
# PyPI's own torch 2.13.0 wheel is the CUDA 13.0 build (it depends on cuda-toolkit 13.0.3) and
# needs a driver >= 580: pass --build-arg TORCH_INDEX_URL=https://pypi.org/simple to use it.
# The wheel carries its CUDA libraries, so the base needs none; the host (or the NVIDIA
# device plugin on Kubernetes) provides the driver.
FROM python:3.11.14-slim-bookworm

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/convoy/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# redis-server: convoy-started replay shards and the chart's shard StatefulSet.
# openssh-client and rsync: `ray up` runs the autoscaler inside the head container, which
# reaches worker hosts over ssh and copies its bootstrap files in with rsync.
# Versions are Debian bookworm(-security)'s; bump them when Debian supersedes them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        redis-server=5:7.0.15-1~deb12u10 \
        openssh-client=1:9.2p1-2+deb12u10 \
        rsync=3.5.0+ds1-0+deb12u1 \
    && rm -rf /var/lib/apt/lists/*

# uid 1000 matches the default login user of the cloud images (ubuntu), so files `ray up`
# bind-mounts from the host (the Ray auth token) stay readable inside the container.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray

WORKDIR /opt/src/convoy
COPY deploy/docker/constraints.txt deploy/docker/requirements-head.txt /opt/
RUN python -m venv /opt/convoy \
    && pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY pyproject.toml README.md ./
COPY common ./common
COPY actors ./actors
COPY replay_service ./replay_service
COPY learner ./learner
COPY deploy ./deploy
RUN PIP_CONSTRAINT=/opt/constraints.txt pip install --requirement /opt/requirements-head.txt ".[s3,gcs]" \
    && python -c "import deploy.cli, ray, torch; print('convoy ok: torch', torch.__version__, 'ray', ray.__version__)"

USER 1000:1000
ENV HOME=/home/ray
WORKDIR /home/ray
CMD ["bash"]
