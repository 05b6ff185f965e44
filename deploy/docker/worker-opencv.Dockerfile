# syntax=docker/dockerfile:1
# A worker: the inference server (OpenCV DNN backend, the seed's server-opencv-dnn)
# and the worker agent that dials the edge, in one container with no inbound port.
# Build from the repository root:
#   docker build -f deploy/docker/worker-opencv.Dockerfile -t edge-inference/worker-opencv .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with the whole project -------------------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
# Dependencies before code, so editing the code does not re-download ~100 MB of wheels.
RUN python deploy/docker/requirements.py worker > /tmp/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY tunnel/ tunnel/
COPY relay/ relay/
COPY httpcontract/ httpcontract/
COPY runtime/ runtime/
COPY worker_agent/ worker_agent/
COPY inference/ inference/
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import worker_agent.cli, inference.cli"

# ---- runtime -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN groupadd --system --gid 10001 worker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin worker \
 && mkdir -p /var/cache/inference /run/worker-credentials \
 && chown -R 10001:10001 /var/cache/inference /run/worker-credentials
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/healthcheck
COPY deploy/docker/worker_entrypoint.py /usr/local/bin/worker-entrypoint
# The inference server listens on loopback only: the agent beside it is its sole
# client, so the container accepts no connection from any network.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/var/cache/inference \
    INFER_HOST=127.0.0.1 \
    INFER_PORT=8000 \
    INFER_BACKEND=opencv-dnn \
    INFER_MODEL=efficientnet-lite0 \
    INFER_CACHE_DIR=/var/cache/inference \
    AGENT_UPSTREAM=http://127.0.0.1:8000 \
    AGENT_POOL=opencv-dnn \
    AGENT_CA=/run/worker-credentials/ca.pem
USER 10001:10001
WORKDIR /var/cache/inference
# Converted weights survive restarts here, so only the first start pays for conversion.
VOLUME ["/var/cache/inference"]
# Healthy once the model is loaded and warmed; the first start converts weights, hence the long start period.
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["python", "/usr/local/bin/healthcheck", "worker"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "/usr/local/bin/worker-entrypoint"]
