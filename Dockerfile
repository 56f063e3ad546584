# hnseg — grand-challenge algorithm image for HECKTOR 2025 Task 1 (T4 GPU, sm_75).
# Not built in this repository's CI (no Docker engine there); process.py is tested with the same paths instead.
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

# PYTHONPATH: export/to_tensorrt.py imports hnseg_infer from /opt/app (process.py finds it beside itself).
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 DEBIAN_FRONTEND=noninteractive PYTHONPATH=/opt/app
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python-is-python3 \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd -r user && useradd -m --no-log-init -r -g user user
WORKDIR /opt/app

# The CPU set and the GPU libraries. onnxruntime and onnxruntime-gpu both install the `onnxruntime` package and
# cannot live side by side (the CPU wheel's files hide the CUDA provider: microsoft/onnxruntime#26996), so the CPU
# set goes in without its onnxruntime line and onnxruntime-gpu (the same version) takes its place; nothing is
# installed twice and nothing needs uninstalling.
COPY --chown=user:user requirements-cpu.txt requirements-gpu.txt /opt/app/
RUN grep -v '^onnxruntime==' requirements-cpu.txt > /tmp/requirements-cpu-shared.txt \
 && python3 -m pip install --no-cache-dir -r /tmp/requirements-cpu-shared.txt -r requirements-gpu.txt \
 && rm /tmp/requirements-cpu-shared.txt

# TensorRT's libraries come from the tensorrt-cu12-libs wheel (requirements-gpu.txt); onnxruntime's TensorRT EP links
# libnvinfer, libnvinfer_plugin and libnvonnxparser .so.10 and finds them through the loader path. The build fails
# here, not at run time, if the wheel's layout changes.
ENV TRT_LIBS=/usr/local/lib/python3.10/dist-packages/tensorrt_libs
ENV LD_LIBRARY_PATH=${TRT_LIBS}:${LD_LIBRARY_PATH}
RUN for lib in libnvinfer libnvinfer_plugin libnvonnxparser; do test -f "${TRT_LIBS}/${lib}.so.10" \
      || { echo "${lib}.so.10 not found in ${TRT_LIBS}:"; ls "${TRT_LIBS}"; exit 1; }; done

COPY --chown=user:user hnseg_infer /opt/app/hnseg_infer
COPY --chown=user:user process.py /opt/app/
# Engines for the GPU of the machine running the image (for grand-challenge: build them on a T4), e.g.
#   docker run --gpus all --user $(id -u):$(id -g) --entrypoint python -v $PWD/weights:/w IMAGE \
#       export/to_tensorrt.py /w/NAME
COPY --chown=user:user export/to_tensorrt.py /opt/app/export/
COPY --chown=user:user weights /opt/app/weights

USER user
# Weights: /opt/ml/model when grand-challenge extracted a model tarball holding a recipe.json, else weights/ above.
ENTRYPOINT ["python", "process.py"]
