# syntax=docker/dockerfile:1
# The public edge proxy (TLS, client keys, balancing, the tunnel endpoint agents dial).
# Build from the repository root:
#   docker build -f deploy/docker/edge.Dockerfile -t edge-inference/edge .
# The same image runs the one-shot `edge-init` credential setup of docker-compose.yml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtualenv with only the edge's dependencies --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY deploy/docker/requirements.py deploy/docker/requirements.py
# Dependencies before code, so editing the code does not re-download them; versions
# come from pyproject.toml and the model stack (numpy, OpenCV, ONNX) stays out.
RUN python deploy/docker/requirements.py edge > /tmp/requirements.txt \
 && /opt/venv/bin/pip install -r /tmp/requirements.txt
COPY tunnel/ tunnel/
COPY relay/ relay/
COPY httpcontract/ httpcontract/
COPY runtime/ runtime/
COPY edge_proxy/ edge_proxy/
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import edge_proxy.cli"

# ---- runtime -----------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# A fixed numeric uid, so Kubernetes' runAsNonRoot can verify it and named volumes
# created by `edge-init` are readable by the edge.
RUN groupadd --system --gid 10001 edge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin edge \
 && mkdir -p /var/lib/edge-proxy /var/lib/edge-init/private /var/lib/edge-init/workers \
 && chown -R 10001:10001 /var/lib/edge-proxy /var/lib/edge-init
COPY --from=build /opt/venv /opt/venv
COPY deploy/docker/healthcheck.py /usr/local/bin/healthcheck
COPY deploy/docker/edge-init.sh /usr/local/bin/edge-init
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    EDGE_LISTEN=0.0.0.0:8443 \
    EDGE_CERT=/var/lib/edge-proxy/edge.pem \
    EDGE_KEY=/var/lib/edge-proxy/edge-key.pem \
    EDGE_CLIENT_KEYS=/var/lib/edge-proxy/client-keys.json \
    EDGE_WORKER_TOKENS=/var/lib/edge-proxy/worker-tokens.json
USER 10001:10001
WORKDIR /var/lib/edge-proxy
EXPOSE 8443
# Certificates and credential files (read-only in use; written only by edge-init).
VOLUME ["/var/lib/edge-proxy"]
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "/usr/local/bin/healthcheck", "edge"]
# SIGTERM makes the edge stop accepting, drain for EDGE_GRACE, then exit.
STOPSIGNAL SIGTERM
ENTRYPOINT ["edge-proxy"]
CMD ["serve"]
