# The muster image: one statically linked binary and nothing else, so it
# builds without any image registry. Build the binary on the host first; the
# simplest way is `scripts/cluster.sh up`, which does that, builds this image
# and starts docker-compose.yml.
FROM scratch
ARG TARGET=x86_64-unknown-linux-gnu
COPY target/static/${TARGET}/release/muster /muster
ENTRYPOINT ["/muster"]
CMD ["--help"]
