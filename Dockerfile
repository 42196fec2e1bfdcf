# Nimbus server / workers image (used by compose.yml).
#   docker build -t nimbus .
#   docker run --rm nimbus python -m nimbus.server
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what `pip install .` needs (see .dockerignore); the package is pure Python.
COPY . /app
RUN pip install . \
 && useradd --create-home --uid 10001 nimbus

USER nimbus
WORKDIR /home/nimbus

# gRPC port of nimbus.server (NIMBUS_PORT, default 50051)
EXPOSE 50051
CMD ["python", "-m", "nimbus.server"]
