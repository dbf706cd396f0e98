# The image every shipyard node runs from (deploy/k8s uses it for every role):
#   docker build -t registry.example.com/shipyard:0.1.0 .
#   docker run --rm registry.example.com/shipyard:0.1.0 node start --help
# The package and its dependencies go into a virtual environment at /opt/shipyard (the
# path deploy/systemd uses too), built in a first stage so the image keeps no pip cache.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY nodes ./nodes
RUN python -m venv /opt/shipyard \
    && /opt/shipyard/bin/pip install --no-cache-dir --disable-pip-version-check .

FROM python:3.11-slim
# A fixed uid/gid, so Kubernetes' runAsUser/fsGroup and host volumes can name it.
RUN groupadd --system --gid 10001 shipyard \
    && useradd --system --uid 10001 --gid shipyard --home-dir /var/lib/shipyard \
       --create-home --shell /usr/sbin/nologin shipyard
COPY --from=build /opt/shipyard /opt/shipyard
ENV PATH=/opt/shipyard/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHIPYARD_LOG_FORMAT=json
USER 10001:10001
WORKDIR /var/lib/shipyard
# API nodes' HTTP port.
EXPOSE 8080
ENTRYPOINT ["shipyard"]
CMD ["--help"]
