# lcmserve: `make demo` serves the built-in tiny model and writes an image; `make test` runs the tests.
# Both make (once) and use a local virtual environment in $(VENV).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# A CPU machine with the torch wheel on disk takes it from there; a GPU host gets the CUDA build.
TORCH  ?= torch==2.13.0
EXTRAS ?= server,onnx-cpu,dev
PORT   ?= 50051
MODEL  ?= tiny
OUT    ?= out

.PHONY: install demo serve test lint typecheck proto proto-check clean gpu-check-prepare

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: install
	$(BIN)/python -m lcmserve.server.demo --out $(OUT)

serve: install
	$(BIN)/lcmserve serve --model $(MODEL) --port $(PORT)

test: install proto-check lint typecheck
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check client server export tests
	$(BIN)/buf lint

typecheck: install
	$(BIN)/mypy --strict client

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
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir .device/wheels .
	$(BIN)/pip download --quiet --no-deps --dest .device/wheels diffusers==0.42.1 grpcio-status==1.84.0 \
	    grpcio-health-checking==1.84.0 grpcio-reflection==1.84.0 prometheus-client googleapis-common-protos
