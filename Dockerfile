# agentgw in a container: the wheel on its locked, hash-checked runtime dependencies, run as a
# non-root user with its state (SQLite databases, keys, audit journal) in the /data volume.
# Not built by CI: this project's CI machines run no container engine. CI does build the same wheel,
# install it the same way into a fresh venv and run the README's tour through it (scripts/wheel-check).
#
#   docker build -t agentgw .
#   docker run -p 8080:8080 -v agentgw-data:/data agentgw
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements/runtime.txt requirements/dev.txt requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/dev.txt
COPY . .
RUN pip wheel --no-deps --no-build-isolation -w /dist .

FROM python:3.11-slim
COPY requirements/runtime.txt /tmp/runtime.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/runtime.txt && rm /tmp/runtime.txt
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir --no-deps /tmp/agentgw-*.whl && rm /tmp/agentgw-*.whl \
    && useradd --system --uid 10001 --home-dir /data --create-home agentgw
USER agentgw
WORKDIR /data
VOLUME /data
EXPOSE 8080
# Inside a container the gateway must listen beyond loopback; put it behind your TLS proxy.
ENV AGENTGW_HOST=0.0.0.0 AGENTGW_PORT=8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
CMD ["agentgw", "serve"]
