# syntax=docker/dockerfile:1
# The worker service: the stock dramatiq CLI, its health server as a dramatiq fork, production settings.
# Slim, not alpine: psycopg-binary, pydantic-core and friends ship manylinux (glibc) wheels; on musl they would
# build from source or need other wheels. See WORKER_SERVICE.md.

# Mirrors can pass their own copy of the base image.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/venv
# Dependencies first, from the lock file with hashes: a deterministic install, cached apart from the source.
COPY requirements.lock requirements-build.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install --require-hashes --no-deps -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY broker ./broker
COPY health ./health
COPY service ./service
COPY jobs ./jobs
COPY tasks ./tasks
COPY worker ./worker
COPY supabase ./supabase
# Our own wheel, built with the locked build backend (no download at build time).
RUN /opt/build/bin/python -m pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
 && /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl

FROM ${BASE_IMAGE} AS runtime
RUN groupadd --system --gid 10001 worker \
 && useradd --system --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin worker
COPY --from=build /opt/venv /opt/venv
# The wheel carries the queue's SQL, so `python -m service.migrate --bootstrap` works from the image.
WORKDIR /app
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    APP_ENV=production \
    RUN_DIR=/tmp/worker-run \
    HEALTH_CHECK_PORT=8080
USER 10001:10001
EXPOSE 8080
# python is in the image; curl and wget are not. The probe asks /health on HEALTH_CHECK_PORT.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "health.probe"]
# Runs `dramatiq tasks --processes WORKER_PROCESSES --threads MAX_CONCURRENT_JOBS
#       --worker-shutdown-timeout SHUTDOWN_TIMEOUT_MS` in this process after checking the settings.
CMD ["python", "-m", "service.launch"]
