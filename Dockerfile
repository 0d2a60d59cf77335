# The one image behind every app service in docker-compose.yml (worker, listener, relay, audit,
# api, flower). Each service picks its process with `command`; the default runs everything.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only what the package needs: the build context also holds .venv, caches and tests.
WORKDIR /build
COPY pyproject.toml README.md ./
COPY config ./config
COPY sagas ./sagas
COPY service ./service
COPY tasks ./tasks
# flower is only a dev extra of the project; the compose stack runs it from this image too.
RUN pip install . "flower>=2.0" \
    && rm -rf /build

# Non-root. /srv/var is PROVISIONER_DATA_DIR; a named volume mounted there starts as a copy of
# this directory, so it is owned by the service user too.
RUN groupadd --system --gid 10001 provisioner \
    && useradd --system --uid 10001 --gid provisioner --home-dir /srv --shell /usr/sbin/nologin provisioner \
    && mkdir -p /srv/var \
    && chown -R provisioner:provisioner /srv
WORKDIR /srv
USER provisioner

ENV PROVISIONER_DATA_DIR=/srv/var
EXPOSE 8080 5555
CMD ["provisioner", "up"]
