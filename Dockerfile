# syntax=docker/dockerfile:1
# mlseg worker image: a Prefect worker (`docker run IMAGE worker`) or any `mlseg` command.
#
# CPU build (default):
#   docker build -t mlseg .
# CUDA build: PyTorch's CUDA wheels bring their own CUDA runtime (the host needs only the
# NVIDIA driver), so the base stays; give an index and a torch/torchvision pair it holds, e.g.
# the one the GPU benchmarks ran (torch 2.11.0+cu130, bench/README.md):
#   docker build -t mlseg:cuda \
#     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 \
#     --build-arg TORCH_VERSION=2.11.0 --build-arg TORCHVISION_VERSION=0.26.0 .
#
# The default base is pinned by tag and digest (python:3.11.13-slim-bookworm, multi-arch index).
ARG BASE_IMAGE=python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

FROM ${BASE_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU (or CUDA) index, so `pip install .` finds it satisfied and does not
# pull the multi-GB CUDA build from PyPI.
RUN pip install --index-url "${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
WORKDIR /app
# The dependencies first, as pyproject.toml lists them, in a layer of their own that a change
# to the code leaves cached: a push then reinstalls mlseg alone, not its hundred packages.
# s3fs: a registry in the Spaces bucket, which every worker of a stack sees (README)
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['s3']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY README.md ./
COPY mlseg ./mlseg
COPY flows ./flows
COPY expectations ./expectations
RUN pip install --no-deps .

FROM ${BASE_IMAGE} AS runtime
# Caches and settings under /tmp, not the home: a lab runs the image as itself
# (`--user $(id -u):$(id -g)`, whose home is / and not writable) or `--read-only --tmpfs /tmp`,
# where ~/.prefect (task results, the temporary server's database), the model cache of a
# registry in the bucket, torch hub's and matplotlib's folders could not be written. Each
# `docker run --rm` starts a fresh Prefect home, whose temporary server (python -m flows.*) took
# 21-31 s to start on a busy 2-core machine, past Prefect's default 20 s: flows.demo's 180 s.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLSEG_DATA_DIR=/data \
    MLSEG_WORK_POOL=mlseg-pool \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    PREFECT_HOME=/tmp/.prefect \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180
RUN useradd --create-home --uid 10001 --user-group mlseg \
    && mkdir -p /data \
    && chown mlseg:mlseg /data
COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=mlseg:mlseg /app /app
COPY --chmod=0755 infra/docker-entrypoint.sh /usr/local/bin/mlseg-entrypoint
# Relative paths are read and written in the mounted volume, as the flows' are (MLSEG_DATA_DIR):
# `docker run --rm -v "$PWD":/data IMAGE mlseg train my.yaml` keeps runs/my in the lab's folder.
WORKDIR /data
# The commit the image is built from, for the model cards' code version: the image holds no
# .git to ask (deploy.yml passes github.sha).
ARG MLSEG_GIT_COMMIT=""
ENV MLSEG_GIT_COMMIT=${MLSEG_GIT_COMMIT}
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/mlseg-entrypoint"]
CMD ["worker"]
