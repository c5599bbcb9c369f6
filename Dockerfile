# vector-sidecar image: one image for every role; the service picks the subcommand
#   docker run IMAGE worker | api --host 0.0.0.0 --port 8000 | emulator | migrate | ...

# ---- build: install the project and its dependencies into /opt/venv ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependency layer: only pyproject.toml, so editing the code does not reinstall
# the dependencies. setuptools finds no packages yet and installs just the deps.
COPY pyproject.toml ./
RUN pip install .

# Project layer: the real packages (see .dockerignore for what stays out).
COPY . .
RUN pip install --no-deps --force-reinstall . \
 && sidecar --help >/dev/null

# ---- runtime: slim base + the venv, no build context, non-root ----
FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_DATA_DIR=/data
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin sidecar \
 && mkdir -p /data && chown sidecar:sidecar /data
USER sidecar
WORKDIR /data
EXPOSE 8000 8765
ENTRYPOINT ["sidecar"]
CMD ["--help"]
