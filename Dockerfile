# Kalandra Bridge container image.
# Today the image carries the wire tools and the schema migrations (`kalandra frame ...`,
# `kalandra db ...`); the homeserver and bridge entrypoint arrive with those components.
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
ENTRYPOINT ["kalandra"]
CMD ["--help"]
