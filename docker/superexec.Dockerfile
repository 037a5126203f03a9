# The image that runs fedlora's ServerApp and ClientApps (process isolation: one
# SuperExec next to the SuperLink, one next to every SuperNode). Built on the
# official Flower SuperExec image, with the app and its dependencies.
#
#   docker build -f docker/superexec.Dockerfile -t fedlora-superexec .      (from the repo root)
#   CUDA: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG FLWR_VERSION=1.42.0
FROM flwr/superexec:${FLWR_VERSION}

# torch first, from PyTorch's index: the CPU wheel unless TORCH_INDEX_URL names a CUDA one.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=
RUN python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch${TORCH_VERSION:+==${TORCH_VERSION}}"

WORKDIR /app
# The app's dependencies from pyproject.toml, without Flower's simulation extra
# (Ray: not used in a deployment), then the app itself.
COPY --chown=app:app pyproject.toml README.md docker/requirements.py ./
RUN python requirements.py pyproject.toml > /tmp/requirements.txt \
 && python -m pip install --no-cache-dir -r /tmp/requirements.txt
COPY --chown=app:app fedlora ./fedlora
RUN python -m pip install --no-cache-dir --no-deps .

# Writable by the image's user (app, uid 49999): outputs of ServerApps, a node's cache.
USER root
RUN mkdir -p /app/outputs /app/cache && chown app:app /app/outputs /app/cache
USER app
ENV FEDLORA_CACHE_DIR=/app/cache \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    TOKENIZERS_PARALLELISM=false

ENTRYPOINT ["flower-superexec"]
