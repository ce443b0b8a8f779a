# Kalandra Bridge container image: the `kalandra` command (homeserver, admin, client, tools).
# Default: run the homeserver from /data/config.yaml (see example-config.yaml; set tcp_host and
# quic_host to 0.0.0.0 inside a container). The bridge entrypoint arrives with the bridge.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kalandra_core ./kalandra_core
COPY bridge ./bridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 1337 --home-dir /data kalandra \
    && mkdir -p /data /opt/kalandra && chown kalandra /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The migration history is read from next to the installed package's source tree.
COPY alembic /opt/kalandra/alembic
COPY example-config.yaml /opt/kalandra/example-config.yaml
ENV KALANDRA_ALEMBIC_DIR=/opt/kalandra/alembic
USER kalandra
WORKDIR /data
VOLUME /data
EXPOSE 4434/tcp 4433/udp
ENTRYPOINT ["kalandra"]
CMD ["serve", "-c", "/data/config.yaml"]
