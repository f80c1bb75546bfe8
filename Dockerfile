# Minimal image: the package and its `varnet` console script on a CPU torch.
# (The Gadgetron-runtime and MRD-server targets come with the streaming pipeline.)
FROM python:3.11-slim
WORKDIR /opt/varnet-gadget
COPY pyproject.toml README.md constraints-cpu.txt ./
COPY gadget ./gadget
COPY converters ./converters
COPY pipelines ./pipelines
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
 && pip install --no-cache-dir -c constraints-cpu.txt .
RUN useradd --create-home varnet
USER varnet
ENTRYPOINT ["varnet"]
CMD ["--help"]
