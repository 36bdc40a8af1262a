# nbdverify in a container: the runtime only (Debian's python3 and qemu-utils, and the
# package in a venv at /opt/nbdverify), installed by scripts/install, the same script
# tests/test_install.py runs in CI. The rig:
#   docker build -t nbdverify .
#   docker run -v "$PWD/images:/images" -p 10809:10809 nbdverify \
#       serve -i 0.0.0.0 /images/raw.img /images/test.qcow2
# Debian bookworm, because the project relies on Debian's python3 (3.11) and qemu-utils.
FROM debian:bookworm-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Exactly the sources scripts/install builds from, and the script itself.
WORKDIR /usr/src/nbdverify
COPY pyproject.toml README.md ./
COPY protocol/ protocol/
COPY nbdverify/ nbdverify/
COPY scripts/install scripts/lib.sh scripts/

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN scripts/install --prefix /opt/nbdverify \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10809 nbdverify \
    && useradd --system --uid 10809 --gid 10809 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nbdverify \
    && mkdir -p /images \
    && chown 10809:10809 /images

# Numeric, so that a runtime that checks for non-root without /etc/passwd can tell.
USER 10809:10809
WORKDIR /images
VOLUME /images
EXPOSE 10809
ENTRYPOINT ["/opt/nbdverify/bin/nbdverify"]
CMD ["--help"]
