# lcmserve for a CUDA GPU host.
#   docker build -t lcmserve .
#   docker run --gpus all -p 50051:50051 -p 8002:8002 -v $PWD/artifacts:/models lcmserve --model /models/sd15-crack
# The PyPI torch wheel carries its own CUDA libraries, so a slim Python base is enough; the host
# needs only the NVIDIA driver and the container toolkit.
# Build arguments (docs/deploy.md, "The container image"):
#   BASE_IMAGE   a Debian-like image with python3 >= 3.10 and pip on PATH (default python:3.12-slim)
#   TORCH        a pip requirement (default torch==2.13.0 from PyPI, the CUDA build) or the path of a
#                torch wheel inside the build context, e.g. ./wheels/torch-2.13.0+cpu-cp311-...whl
#   TORCHVISION  the same for torchvision; empty leaves it out
# scripts/container_check.sh builds this file with buildah and runs the image's server end to end.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
# pyproject.toml maps the package lcmserve.* onto whole folders (client/, server/, export/ and their
# subfolders): copy the folders whole, so that a new subpackage needs no change here.
COPY pyproject.toml README.md ./
COPY client client
COPY server server
COPY export export
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM ${BASE_IMAGE}
ARG TORCH=torch==2.13.0
# torchvision of the same release as torch (0.28 goes with 2.13): JPEG on the GPU (nvjpeg); without
# it the server encodes JPEG on the host (GetModelInfo.jpeg_encoder says which). Empty: leave it out.
ARG TORCHVISION=torchvision==0.28.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/.hf-cache \
    LCMSERVE_CACHE=/models/.lcmserve-cache
# The build context is mounted read-only at /context for this step only, so that TORCH and
# TORCHVISION may name wheel files in it (relative to the context); a requirement such as
# torch==2.13.0 comes from PyPI as usual. Torch first, in its own layer: the largest download.
RUN --mount=type=bind,target=/context \
    cd /context && pip install "$TORCH" $TORCHVISION
COPY --from=build /wheels /tmp/wheels
RUN pip install "$(ls /tmp/wheels/lcmserve-*.whl)[server]" \
 && rm -rf /tmp/wheels \
 && useradd --create-home --uid 1000 lcmserve \
 && mkdir -p /models && chown lcmserve:lcmserve /models
USER lcmserve
WORKDIR /home/lcmserve
# Export artifacts (or a diffusers folder) are mounted here; HF caches go here too.
VOLUME ["/models"]
EXPOSE 50051 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["lcmserve", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["lcmserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "8002"]
CMD ["--model", "/models/artifact"]
