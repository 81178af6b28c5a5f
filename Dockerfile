# DigiSpine Edge Gateway container. Config and mappings are mounted read-only, the buffer lives
# in the /var/lib/digispine-gateway volume. (Image hardening and size report: issue #8.)
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/digispine-gateway gateway \
 && mkdir -p /var/lib/digispine-gateway && chown gateway /var/lib/digispine-gateway
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    DIGISPINE_CONFIG=/etc/digispine-gateway/gateway.yaml \
    DIGISPINE_BUFFER__DIRECTORY=/var/lib/digispine-gateway \
    DIGISPINE_HEALTH__LISTEN=0.0.0.0:8311
USER gateway
VOLUME ["/var/lib/digispine-gateway"]
EXPOSE 8311
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:8311/healthz', timeout=4)" || exit 1
ENTRYPOINT ["digispine-gateway"]
CMD ["run"]
