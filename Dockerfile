# One image for the router, the host and the migrator CLI (compose.yaml runs it several ways).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY router router
COPY host host
COPY plugins plugins
COPY shard_migrations shard_migrations
COPY loadtests loadtests
RUN pip install --no-cache-dir '.[load]'
ENV TENANTFLEET_BIND_HOST=0.0.0.0
ENTRYPOINT ["tenantfleet"]
