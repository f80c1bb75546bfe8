# Two targets (docker build --target ...):
#   gadgetron   Gadgetron runtime image + torch + this package in Gadgetron's Python, chains in its config folder
#   mrd-server  slim standalone MRD stream server on port 9002, non-root
# Mount model weights at /models/model.pt (or pass --checkpoint).
ARG GADGETRON_IMAGE=ghcr.io/gadgetron/gadgetron/gadgetron_ubuntu_rt_nocuda:latest
ARG PYTHON_IMAGE=python:3.11-slim
# CPU wheels by default; for CUDA use e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

# ---------------------------------------------------------------- Gadgetron runtime + our gadget
FROM ${GADGETRON_IMAGE} AS gadgetron
ARG TORCH_INDEX
ARG TORCH_VERSION
# Where Gadgetron looks for chain XML files in its images (override if your image differs).
ARG GADGETRON_CONFIG_DIR=/opt/conda/envs/gadgetron/share/gadgetron/config
ARG GADGETRON_PYTHON=python3
COPY . /opt/varnet-gadget
RUN ${GADGETRON_PYTHON} -m pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==${TORCH_VERSION} \
 && ${GADGETRON_PYTHON} -m pip install --no-cache-dir /opt/varnet-gadget \
 && mkdir -p ${GADGETRON_CONFIG_DIR} \
 && cp /opt/varnet-gadget/pipelines/*.xml ${GADGETRON_CONFIG_DIR}/
# chains: varnet-external.xml, varnet-after-noiseadjust.xml, varnet-connect.xml

# ---------------------------------------------------------------- standalone MRD server
FROM ${PYTHON_IMAGE} AS mrd-server
ARG TORCH_INDEX
ARG TORCH_VERSION
WORKDIR /opt/varnet-gadget
COPY pyproject.toml README.md ./
COPY gadget ./gadget
COPY converters ./converters
COPY pipelines ./pipelines
RUN pip install --no-cache-dir --index-url ${TORCH_INDEX} torch==${TORCH_VERSION} \
 && pip install --no-cache-dir . \
 && useradd --create-home --uid 10001 varnet
USER varnet
EXPOSE 9002
# Inside a container the server must listen on all interfaces; publish the port deliberately.
ENTRYPOINT ["varnet", "serve", "--host", "0.0.0.0", "--port", "9002"]
CMD ["--checkpoint", "/models/model.pt"]
