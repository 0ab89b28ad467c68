# lcmserve: `make demo` serves the built-in tiny model and writes an image; `make test` runs the tests.
# Both make (once) and use a local virtual environment in $(VENV).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU machine with the torch wheel on disk takes it from there; a GPU host gets the CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= server,onnx-cpu,dev
PORT   ?= 50051
METRICS_PORT ?= 8002
MODEL  ?= tiny
OUT    ?= out

.PHONY: install demo serve test lint typecheck proto proto-check clean gpu-check-prepare container-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/python -m lcmserve.demo --out $(OUT)

serve: install
	$(BIN)/lcmserve serve --model $(MODEL) --port $(PORT) --metrics-port $(METRICS_PORT)

test: install proto-check lint typecheck
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check client server export tests
	$(BIN)/buf lint

# mypy cannot follow the editable install's package-dir mapping, so it checks a tree of links
# laid out as the installed package is: lcmserve/ = client/*, lcmserve/server, lcmserve/export.
typecheck: install
	rm -rf build/typecheck && mkdir -p build/typecheck/lcmserve
	for f in client/*; do ln -s "$(CURDIR)/$$f" build/typecheck/lcmserve/; done
	ln -s "$(CURDIR)/server" build/typecheck/lcmserve/server
	ln -s "$(CURDIR)/export" build/typecheck/lcmserve/export
	cd build/typecheck && "$(abspath $(BIN))/mypy" --strict --config-file "$(CURDIR)/pyproject.toml" -p lcmserve

# Regenerate the gRPC stubs in client/v1 from protos/ (grpcio-tools pinned in the dev extra).
proto: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python protos/generate.py

# CI: the committed stubs must match protos/.
proto-check: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python protos/generate.py --check

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info

# Wheels the GPU machine lacks (it has no registry), carried there in .device/ (git-ignored).
gpu-check-prepare: install
	rm -rf .device && mkdir -p .device/wheels
	set -e; for312="--only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64"; \
	$(BIN)/pip download --quiet --no-deps $$for312 --dest .device/wheels grpcio==1.84.0 protobuf==7.36.2 \
	    grpcio-status==1.84.0 grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 \
	    googleapis-common-protos==1.76.0 prometheus-client==0.26.0 diffusers==0.42.1; \
	rm -rf /tmp/lcmserve-wheel-check; \
	$(BIN)/pip install --quiet --no-index --no-deps $$for312 --target /tmp/lcmserve-wheel-check .device/wheels/*.whl; \
	rm -rf /tmp/lcmserve-wheel-check; echo "pip install --target accepts .device/wheels for CPython 3.12 manylinux x86_64"
	if [ -f ../shared/anchors/gpu_baseline.py ]; then mkdir -p .device/anchors && cp ../shared/anchors/gpu_baseline.py .device/anchors/; fi
	du -sh .device

# The Dockerfile built with buildah and its server run from the image, end to end (root on a Debian
# host; a few minutes, so not part of `make test`; docs/deploy.md).
container-check: install
	bash scripts/container_check.sh
