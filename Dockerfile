# Kalandra Bridge container image: the bridge (Matrix appservice) with the embedded Kalandra
# homeserver, plus the `kalandra` command (admin, client, tools). State lives in the /data volume.
# First start: writes /data/config.yaml from the example and exits (edit it); second start: writes
# /data/registration.yaml and exits (give it to Synapse); then it runs (config/docker-run.sh).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kalandra_core ./kalandra_core
COPY bridge ./bridge
# Only the project itself: its dependencies come from the lock file, checked by hash.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 1337 --home-dir /data kalandra \
    && mkdir -p /data /opt/kalandra && chown kalandra /data
COPY requirements.lock /tmp/requirements.lock
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.lock && rm /tmp/requirements.lock
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/*.whl && rm -rf /wheels
# The migration history and the example config are read from here by the installed package.
COPY alembic /opt/kalandra/alembic
COPY example-config.yaml /opt/kalandra/example-config.yaml
COPY config /opt/kalandra/config
ENV KALANDRA_ALEMBIC_DIR=/opt/kalandra/alembic \
    KALANDRA_EXAMPLE_CONFIG=/opt/kalandra/example-config.yaml \
    KALANDRA_DATA=/data
USER kalandra
WORKDIR /data
VOLUME /data
# Kalandra native clients (TCP, QUIC) and the appservice port Synapse pushes to.
EXPOSE 4434/tcp 4433/udp 29340/tcp
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:29340/_matrix/mau/live', timeout=4)"
ENTRYPOINT ["/opt/kalandra/config/docker-run.sh"]
