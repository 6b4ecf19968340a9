# soar-lite web app on one CUDA GPU (README.md, "Docker"):
#   docker build -t soar-lite .
#   docker run --gpus all -p 7860:7860 -v soar-lite-data:/data -e SOAR_LITE_AUTH=me:a-long-password soar-lite
# Hardware: an NVIDIA GPU with a driver for CUDA 12.8 (>= 570; Blackwell sm_120 included).
# The base image brings the CUDA build of torch (2.7.1, inside soar-lite's torch>=2.4,<2.14), which is
# README's "install the CUDA build of torch you want first"; the package is then installed with the
# README's own command for the app (tests/test_app_server.py checks the two stay the same).
# BASE_IMAGE: any image with Python >= 3.10, `pip` on PATH and torch installed. CI builds this same file
# on a CPU stand-in (`--build-arg BASE_IMAGE=...`, made by .ci/docker: Debian + a venv with CPU torch)
# because Docker Hub, and so the CUDA image, cannot be reached there.
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

# Everything that must outlive the container sits in the /data volume: the built-in tiny base and
# caches (SOAR_LITE_HOME), downloaded hub models (HF_HOME), and runs + uploaded datasets (--runs-dir).
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    SOAR_LITE_HOME=/data/home \
    HF_HOME=/data/hf

RUN useradd --create-home --uid 1000 soar \
    && mkdir -p /data /opt/soar-lite \
    && chown soar:soar /data /opt/soar-lite

WORKDIR /opt/soar-lite
COPY --chown=soar:soar . .
RUN pip install -e ".[app]"

USER 1000:1000
VOLUME ["/data"]
EXPOSE 7860

# 0.0.0.0 inside the container so that `docker run -p` can publish the port. Whoever can reach the
# port can upload data and start runs: set SOAR_LITE_AUTH=user:password (or add --auth user:password),
# or publish on loopback only (-p 127.0.0.1:7860:7860). Without either, the app prints a warning.
# The app runs as PID 1, where the kernel drops signals that have no handler: SIGTERM (docker stop's
# default) would be ignored and the container killed after 10 s. Python handles SIGINT itself
# (KeyboardInterrupt), so the app closes its server and exits 0 in seconds (.ci/docker checks this).
STOPSIGNAL SIGINT
CMD ["soar-lite", "app", "--host", "0.0.0.0", "--port", "7860", "--runs-dir", "/data/runs"]
