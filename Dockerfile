# improv server image. CPU by default; for CUDA:
#   docker build --build-arg BASE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#                --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 -t improv:cuda .
# Run: docker run -p 8000:8000 improv        (serves models/default, copied in at build time)
# The install steps are the Makefile's: pip with -c constraints.txt; here from the built wheel.
ARG BASE=python:3.11-slim

# --- build the wheel -------------------------------------------------------------------------------
FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY cli cli
COPY engine engine
COPY trainer trainer
COPY server server
COPY clients clients
COPY protocol protocol
COPY midi midi
COPY models models
RUN python -m pip install -q --upgrade pip build && python -m build --wheel --outdir /dist

# --- runtime ---------------------------------------------------------------------------------------
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
# A CUDA base image has no Python of its own.
RUN if ! command -v python3 >/dev/null; then \
        apt-get update && apt-get install -y --no-install-recommends python3 python3-pip \
        && rm -rf /var/lib/apt/lists/*; fi
COPY --from=wheel /dist/*.whl /tmp/
COPY constraints.txt /tmp/constraints.txt
# Not editable: the wheel, with the pinned torch from the CPU (or CUDA) index.
RUN python3 -m pip install -q --extra-index-url ${TORCH_INDEX} -c /tmp/constraints.txt /tmp/*.whl \
    && rm /tmp/*.whl
RUN useradd --create-home --uid 10001 improv
WORKDIR /home/improv
COPY --chown=improv:improv models/default models/default
USER improv
# Inside a container the server must listen on all interfaces, and whether the port reaches a
# network is decided by `docker run -p`, so the image opts out of the no-token refusal
# (IMPROV_ALLOW_OPEN, logged as a warning). Publishing beyond this machine: set IMPROV_TOKEN.
ENV IMPROV_HOST=0.0.0.0 IMPROV_PORT=8000 IMPROV_CHECKPOINT=models/default IMPROV_ALLOW_OPEN=1
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
CMD ["improv", "serve"]
