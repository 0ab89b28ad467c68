# lcmserve for a CUDA GPU host.
#   docker build -t lcmserve .
#   docker run --gpus all -p 50051:50051 -p 8002:8002 -v $PWD/artifacts:/models lcmserve --model /models/sd15-crack
# The PyPI torch wheel carries its own CUDA libraries, so a slim Python base is enough; the host
# needs only the NVIDIA driver and the container toolkit.

FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY client client
COPY server server
COPY export export
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM python:3.12-slim
ARG TORCH=torch==2.13.0
# torchvision of the same release as torch (0.28 goes with 2.13): JPEG on the GPU (nvjpeg); without
# it the server encodes JPEG on the host (GetModelInfo.jpeg_encoder says which). Empty: leave it out.
ARG TORCHVISION=torchvision==0.28.0
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/models/.hf-cache \
    LCMSERVE_CACHE=/models/.lcmserve-cache
COPY --from=build /wheels /wheels
RUN pip install "$TORCH" $TORCHVISION \
 && pip install "$(ls /wheels/lcmserve-*.whl)[server]" \
 && rm -rf /wheels \
 && useradd --create-home --uid 1000 lcmserve \
 && mkdir -p /models && chown lcmserve /models
USER lcmserve
WORKDIR /home/lcmserve
# Export artifacts (or a diffusers folder) are mounted here; HF caches go here too.
VOLUME ["/models"]
EXPOSE 50051 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["lcmserve", "health", "--target", "127.0.0.1:50051"]
ENTRYPOINT ["lcmserve", "serve", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "8002"]
CMD ["--model", "/models/artifact"]
