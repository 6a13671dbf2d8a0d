# The chorus binary with what its sandbox and Python plugins need at run time.
#   docker build -t chorus:latest .
# The manifests under deploy/k8s/ use this image. For GPU builds add --build-arg FEATURES=cuda
# (cudarc loads the CUDA libraries at run time; give the image the NVIDIA runtime).
FROM rust:1.94-bookworm AS build
ARG FEATURES=""
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin chorus ${FEATURES:+--features $FEATURES} \
    && cp target/release/chorus /usr/local/bin/chorus

FROM debian:bookworm-slim
# python3: code environments and Python plugins; bubblewrap: the sandbox's namespaces.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 bubblewrap ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/chorus /usr/local/bin/chorus
RUN useradd --create-home chorus
USER chorus
WORKDIR /home/chorus
ENTRYPOINT ["chorus"]
CMD ["--help"]
