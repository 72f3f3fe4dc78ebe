# Worker image for every process of DESIGN.md (generation, enhancement, media, bridge,
# dashboard): one image, the command picks the role (see docker-compose.yml).
#
# The CUDA *base* image is enough: the torch wheels from the PyTorch CUDA index carry
# their own CUDA runtime, cuDNN and cuBLAS as pip packages; the driver comes from the
# host through the NVIDIA container toolkit. Its NVIDIA_* variables make the toolkit
# expose the GPU. CUDA 12.8 needs host driver >= 570 (covers Ada, Hopper and Blackwell).
FROM nvidia/cuda:12.8.1-base-ubuntu22.04

# PyTorch's wheel index for the CUDA build of the pinned torch (requirements.txt).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python 3.11 (the project's version) in a venv, so pip never touches the system Python.
# No system ffmpeg: PyAV's wheel ships its own FFmpeg with libx264.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv "$VIRTUAL_ENV"

# Dependencies first, in their own layer: a code change does not reinstall torch.
# requirements.txt pins torch==2.13.0; --extra-index-url lets pip see the PyTorch index
# too, where the same release is published as 2.13.0+cu128 (it satisfies ==2.13.0 and
# sorts above PyPI's build), so the GPU build built against CUDA 12.8 is installed.
# Everything else still comes from PyPI.
# requirements-gpu.txt adds torchao (QUANTIZE=fp8).
COPY requirements.txt requirements-gpu.txt /tmp/
RUN pip install --extra-index-url "$TORCH_INDEX_URL" -r /tmp/requirements.txt \
        -r /tmp/requirements-gpu.txt \
    && rm /tmp/requirements.txt /tmp/requirements-gpu.txt

# Unprivileged runtime user. /spool and /outputs are created here, owned by it, so the
# named volumes mounted there start out writable by the workers (Docker copies the
# image directory's ownership into an empty named volume).
RUN useradd --create-home --uid 1000 --shell /usr/sbin/nologin app \
    && mkdir -p /app /spool /outputs /models \
    && chown app:app /spool /outputs

WORKDIR /app

# The repo's code, package by package (DESIGN.md "Layout"). Listed rather than `COPY . .`
# so a developer's .env (secrets; Settings reads ./.env), .venv, .git, spool/ and
# outputs/ never end up baked into the image. Owned by root: the workers can read the
# code but not change it.
COPY pyproject.toml celeryconfig.py ./
COPY tasks/ ./tasks/
COPY worker/ ./worker/
COPY enhancement/ ./enhancement/
COPY media/ ./media/
# The code as an installed package too, for its entry points (`celery -A tasks jobs ...`).
RUN pip install --no-deps --no-build-isolation --editable .

USER app

# Weights are mounted read-only at /models; never fetch from the hub at run time.
ENV HF_HUB_OFFLINE=1 \
    HF_HOME=/home/app/.cache/huggingface

# Harmless default: print the effective settings (secrets masked) and exit. Each
# service in docker-compose.yml gives its own command from DESIGN.md's process table.
CMD ["python", "-m", "worker", "config"]
