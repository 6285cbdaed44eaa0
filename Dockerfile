# The membership prediction service: Gunicorn serving the registry's Production model on MODEL_PORT (9696).
# The same image runs the local profile's MLflow server and trainer (docker-compose.yml).

# Builder: the locked default packages (no dev ones), hash-checked, into a virtual environment.
FROM python:3.11-slim AS builder
ARG PIPENV_VERSION=2026.10.3
WORKDIR /build
RUN pip install --no-cache-dir --disable-pip-version-check "pipenv==${PIPENV_VERSION}"
COPY Pipfile Pipfile.lock ./
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The venv gets no pip or setuptools of its own, and loses the packages' test suites (~130 MB never imported).
# The project itself is not installed from the lock (it is `-e .` there): its code is copied below.
RUN pipenv requirements --hash | grep -v '^-e ' > requirements.txt \
    && python -m venv --without-pip /opt/venv \
    && pip --python /opt/venv/bin/python install --no-cache-dir --disable-pip-version-check --no-deps \
        --require-hashes -r requirements.txt \
    && find /opt/venv -depth -type d -name tests -exec rm -rf {} +

# Runtime: the virtual environment and the service's code, nothing else (see .dockerignore).
FROM python:3.11-slim
# There is no git in the image: GIT_PYTHON_REFRESH=quiet stops GitPython warning when MLflow imports it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    MODEL_PORT=9696 \
    MODEL_CACHE_DIR=/var/cache/bikeshare-membership \
    NUMBA_CACHE_DIR=/var/cache/bikeshare-membership/numba \
    MLFLOW_DISABLE_TELEMETRY=true \
    GIT_PYTHON_REFRESH=quiet
COPY --from=builder /opt/venv /opt/venv
# The service's user. Its uid must be able to read the mounted ~/.aws: 1000 is the default user of the usual
# EC2 images (ec2-user, ubuntu, admin). /var/lib/mlflow is the local profile's registry.
ARG APP_UID=1000
RUN useradd --uid "$APP_UID" --user-group --create-home --shell /usr/sbin/nologin app \
    && mkdir -p "$MODEL_CACHE_DIR" /var/lib/mlflow \
    && chown app:app "$MODEL_CACHE_DIR" /var/lib/mlflow
WORKDIR /app
COPY *.py ./
COPY bikeshare_membership/ bikeshare_membership/
COPY data/stations.csv data/
USER ${APP_UID}
EXPOSE 9696
VOLUME ["/var/cache/bikeshare-membership"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ['MODEL_PORT']}/health\", timeout=4)"]
CMD ["gunicorn", "--config", "gunicorn.conf.py"]
