# ppml-serve: one image for every part (gateway, worker, key broker, or all of them with 'up');
# the command picks it:
#   docker run -p 8443:8443 ppml-serve up --host 0.0.0.0      # a trial: the demo model
#   docker build -t ppml-serve .                                # ONNX Runtime
#   docker build -t ppml-serve:openvino --build-arg EXTRAS=openvino .
# No key, certificate or password is baked in: they are mounted at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG RUST_IMAGE=rust:1.85-slim-bookworm

# The Rust toolchain only builds the native extension (native/); the image runs without it.
FROM ${RUST_IMAGE} AS rust

FROM ${PYTHON_IMAGE} AS build
ARG EXTRAS=""
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
COPY --from=rust /usr/local/rustup /usr/local/rustup
COPY --from=rust /usr/local/cargo /usr/local/cargo
# aws-lc (AES-GCM under the envelope) is C: it needs a compiler
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY native ./native
COPY src ./src
RUN python -m venv /opt/ppml \
    && /opt/ppml/bin/pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="ppml-serve" \
      org.opencontainers.image.licenses="Apache-2.0"
# redis-server: 'ppml-serve up' (everything in one container, for a trial) starts its own;
# gateway, worker and key broker never run it.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin ppml \
    && mkdir -p /var/lib/ppml && chown ppml:ppml /var/lib/ppml
COPY --from=build /opt/ppml /opt/ppml
ENV PATH=/opt/ppml/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /var/lib/ppml
EXPOSE 8443 8444
# The gateway answers on 8443; other parts are checked by Kubernetes probes instead.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 8443), 2)"]
ENTRYPOINT ["ppml-serve"]
CMD ["--help"]
