# DigiSpine Edge Gateway container image. Run it as docs/operations.md#container shows:
# config and mapping files mounted read-only at /etc/digispine-gateway, the buffer in the
# /var/lib/digispine-gateway volume, secrets as files in /run/secrets, the health port
# published to the host's 127.0.0.1 only. Checked with hadolint in `make lint`.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the package and its dependencies into a venv (all of them ship wheels) -----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir . \
 && /opt/venv/bin/pip uninstall --yes pip setuptools

# -- runtime: the venv on a fresh slim image, no build tools, not root -----------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="DigiSpine Edge Gateway" \
      org.opencontainers.image.description="OPC UA, MQTT and Modbus signals to CloudEvents DomainEvents in Kafka, buffered on disk" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/operations.md"
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/digispine-gateway --shell /usr/sbin/nologin gateway \
 && install -d -o gateway -g gateway -m 0700 /var/lib/digispine-gateway
COPY --from=build /opt/venv /opt/venv
# The health endpoint listens on every interface of the container's own network namespace;
# publish it to the host's loopback only (-p 127.0.0.1:8311:8311). Secrets: one file per
# setting in /run/secrets, named like the variable (DIGISPINE_KAFKA__SASL_PASSWORD).
# DL3064 flags DIGISPINE_SECRETS_DIR by its name: it is a directory path, no secret.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONFAULTHANDLER=1 \
    DIGISPINE_CONFIG=/etc/digispine-gateway/gateway.yaml \
    DIGISPINE_BUFFER__DIRECTORY=/var/lib/digispine-gateway \
    DIGISPINE_SECRETS_DIR=/run/secrets \
    DIGISPINE_HEALTH__LISTEN=0.0.0.0:8311
WORKDIR /var/lib/digispine-gateway
USER 10001:10001
VOLUME ["/var/lib/digispine-gateway"]
EXPOSE 8311
# SIGTERM: sources stop, the pipeline drains, Kafka gets 10 s; give it `docker stop -t 30`.
STOPSIGNAL SIGTERM
# 200 while the gateway buffers and forwards (Kafka or a source away is "degraded", still 200);
# 503 when a core component stopped or forwarding stalled: then the container is unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8311/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["digispine-gateway"]
CMD ["run"]
