# tiercache: the cache service image. Build: docker build -t tiercache .
# Run: docker run -p 8080:8080 -e REDIS_HOST=redis -v tiercache-data:/app/data tiercache
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /app

# The package and its metadata only (.dockerignore keeps tests, venvs and data out).
# README.md* tolerates a missing README; pyproject.toml names it as the long description.
COPY pyproject.toml README.md* ./
COPY service ./service
COPY monitor ./monitor

# Versions: pyproject.toml's lower bounds, resolved at build time (no lock file yet).
RUN pip install --no-cache-dir . \
    && groupadd --system --gid 10001 tiercache \
    && useradd --system --uid 10001 --gid tiercache --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin tiercache \
    && mkdir -p /app/data \
    && chown tiercache:tiercache /app/data

ENV HTTP_HOST=0.0.0.0 \
    HTTP_PORT=8080 \
    CACHE_DB_PATH=/app/data/cache.db

# The SQLite tier: keep it across container restarts.
VOLUME ["/app/data"]

# Numeric, so the runtime (and Kubernetes runAsNonRoot) can tell it is not root.
USER 10001:10001

EXPOSE 8080

# slim has no curl: ask /health with the interpreter already there. Any non-2xx or no answer
# within the timeout fails the check.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HTTP_PORT', '8080') + '/health', timeout=2)"]

CMD ["python", "-m", "service"]
