# syntax=docker/dockerfile:1
# A GPU worker: the inference server (TensorFlow backend, the seed's server-tf-gpu) and
# the worker agent, on the TensorFlow GPU base image, in one container with no inbound port.
# Build from the repository root:
#   docker build -f deploy/docker/worker-tf-gpu.Dockerfile -t edge-inference/worker-tf-gpu .
# Run with the NVIDIA container toolkit (`--gpus all`, or the compose `gpu` profile).

# TensorFlow's GPU images ship Python 3.11 since 2.16; the project needs 3.11+.
ARG TF_IMAGE=tensorflow/tensorflow:2.16.1-gpu

# ---- build: a virtualenv that sees the base image's TensorFlow -----------------------
FROM ${TF_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -c "import sys; sys.exit(0 if sys.version_info >= (3, 11) else 'error: this base image has Python %d.%d; the project needs 3.11+; pass --build-arg TF_IMAGE=<a TensorFlow GPU image with Python 3.11+>' % sys.version_info[:2])"
WORKDIR /src
# --system-site-packages keeps the base image's CUDA-enabled TensorFlow; installing the
# project's `tensorflow` extra would replace it with tensorflow-cpu. --without-pip
# avoids needing ensurepip (absent from Ubuntu's Python); the base's pip installs into
# the venv when run by the venv's interpreter.
RUN python3 -m venv --system-site-packages --without-pip /opt/venv
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
RUN python3 deploy/docker/requirements.py worker > /tmp/requirements.txt \
 && /opt/venv/bin/python -m pip install -r /tmp/requirements.txt
COPY tunnel/ tunnel/
COPY relay/ relay/
COPY httpcontract/ httpcontract/
COPY runtime/ runtime/
COPY worker_agent/ worker_agent/
COPY inference/ inference/
RUN /opt/venv/bin/python -m pip install --no-deps . \
 && /opt/venv/bin/python -c "import tensorflow, worker_agent.cli, inference.cli"

# ---- runtime -----------------------------------------------------------------------
FROM ${TF_IMAGE} AS runtime
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin worker \
 && mkdir -p /var/cache/inference /run/worker-credentials \
 && chown -R 10001:10001 /var/cache/inference /run/worker-credentials
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/healthcheck
COPY deploy/docker/worker_entrypoint.py /usr/local/bin/worker-entrypoint
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/cache/inference \
    TF_CPP_MIN_LOG_LEVEL=1 \
    TF_FORCE_GPU_ALLOW_GROWTH=true \
    INFER_HOST=127.0.0.1 \
    INFER_PORT=8000 \
    INFER_BACKEND=tensorflow \
    INFER_MODEL=efficientnet-lite0 \
    INFER_CACHE_DIR=/var/cache/inference \
    AGENT_UPSTREAM=http://127.0.0.1:8000 \
    AGENT_POOL=tensorflow \
    AGENT_CA=/run/worker-credentials/ca.pem
USER 10001:10001
WORKDIR /var/cache/inference
VOLUME ["/var/cache/inference"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/bin/healthcheck", "worker"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "/usr/local/bin/worker-entrypoint"]
