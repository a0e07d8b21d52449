# generate, report and API-model baselines (compose services generate, report, baseline-api, transfer, compare,
# publish): no torch, nothing compiled. Built by `make images` (context: the repository root, see .dockerignore).
# Every file here builds with the engine's own BuildKit: no `# syntax=` line (it would fetch a frontend image).
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG PIP_INDEX_URL
# The host's CA bundle (`make images` passes it as the BuildKit secret `ca`) is mounted over the image's own
# for the steps that download, so a TLS-inspecting proxy works and the bundle never lands in a layer.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# Requirement files before any code, so editing a stage does not reinstall the dependencies.
COPY requirements/base.txt requirements/api.txt requirements/report.txt /src/requirements/
RUN --mount=type=secret,id=ca,target=/etc/ssl/certs/ca-certificates.crt \
    python -m venv /opt/venv \
 && /opt/venv/bin/pip install -r /src/requirements/api.txt -r /src/requirements/report.txt

FROM ${PYTHON_IMAGE}
ARG PROJECT_VERSION=unknown
LABEL org.opencontainers.image.title="cart-intent-python" \
      org.opencontainers.image.description="cart-intent SLM: generate, report, API baselines" \
      org.opencontainers.image.version="${PROJECT_VERSION}" \
      cart-intent.requirements="requirements/api.txt requirements/report.txt"
RUN useradd --uid 10001 --create-home app
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 MPLBACKEND=Agg
WORKDIR /app
COPY cart_intent/ /app/cart_intent/
COPY stages/ /app/stages/
USER app
CMD ["python", "-m", "stages.generate", "--help"]
