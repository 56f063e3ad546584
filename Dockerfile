# hnseg — grand-challenge algorithm image for HECKTOR 2025 Task 1 (T4 GPU, sm_75).
# Not built in this repository's CI (no Docker engine there); process.py is tested with the same paths instead.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd -r user && useradd -m --no-log-init -r -g user user
WORKDIR /opt/app

COPY --chown=user:user requirements.txt /opt/app/
RUN python3 -m pip install --no-cache-dir -r requirements.txt

COPY --chown=user:user hnseg_infer /opt/app/hnseg_infer
COPY --chown=user:user process.py /opt/app/
COPY --chown=user:user weights /opt/app/weights

USER user
# Weights: /opt/ml/model when grand-challenge extracted a model tarball holding a recipe.json, else weights/ above.
ENTRYPOINT ["python", "process.py"]
