# convoy CARLA collector image: the CARLA 0.9.16 server image with convoy's collector
# installed. Each collector launches its own server from $CARLA_ROOT (actors/carla/server.py),
# so this is the image of the CARLA worker nodes of a `ray up` cluster and of the KubeRay
# CARLA worker group.
#
#   docker build -f deploy/docker/carla.Dockerfile -t REGISTRY/convoy/carla-collector:0.1.0 .
#
# The CARLA image is Ubuntu 20.04 without a Python >= 3.11, and every node of a Ray cluster must
# run the same Python and Ray as the head (learner.Dockerfile: Python 3.11.14, Ray from
# constraints.txt). uv installs that same CPython build (python-build-standalone, linked
# against an old glibc) without touching the system packages. The carla 0.9.16 client wheel
# is manylinux_2_31 (Ubuntu 20.04's glibc). Collectors act on the CPU, so torch is the CPU
# build: the GPUs stay with the CARLA servers.
FROM ghcr.io/astral-sh/uv:0.13.8 AS uv

FROM carlasim/carla:0.9.16

ARG PYTHON_VERSION=3.11.14
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/convoy/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

COPY --from=uv /uv /usr/local/bin/uv

# Installing into /opt needs root; the server and the collector run as the image's `carla` user.
USER root

# Where the server lives differs between CARLA image builds (/home/carla, /workspace);
# resolve it once here so CARLA_ROOT is right, and fail the build if there is no server.
RUN launcher="$(find / -maxdepth 3 -name CarlaUE4.sh -not -path '/proc/*' -print -quit)" \
    && test -n "${launcher}" \
    && ln -s "$(dirname "${launcher}")" /opt/carla
ENV CARLA_ROOT=/opt/carla

WORKDIR /opt/src/convoy
COPY deploy/docker/constraints.txt /opt/constraints.txt
RUN uv python install "${PYTHON_VERSION}" \
    && uv venv --python "${PYTHON_VERSION}" /opt/convoy \
    && uv pip install --python /opt/convoy/bin/python --index-url "${TORCH_INDEX_URL}" torch==2.13.0

COPY pyproject.toml README.md ./
COPY common ./common
COPY actors ./actors
COPY replay_service ./replay_service
COPY learner ./learner
COPY deploy ./deploy
RUN uv pip install --python /opt/convoy/bin/python --constraint /opt/constraints.txt ".[carla,s3,gcs]" "ray[default]==2.60.0" \
    && python -c "import carla, deploy.cli, ray; print('convoy ok: ray', ray.__version__)"

USER carla
ENV HOME=/home/carla
WORKDIR /home/carla
CMD ["bash"]
