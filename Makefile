# convserve: `make serve` sets everything up on a fresh machine and serves;
# `make test` runs the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.convserve-installed
PYTEST_ARGS ?=

.PHONY: install serve test loadtest observe soak fuzz clean

# One virtual environment for everything: the embedded Triton's python backend stub
# runs the environment first on PATH, so torch, onnxruntime and this package live here.
$(STAMP): pyproject.toml setup.py requirements.txt $(wildcard protos/convserve/v1/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 exactly: it takes the local CPU build (other specs pull CUDA wheels).
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	# Editable install; its build step generates the protobuf code from protos/.
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

serve: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/convserve serve

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# Bounded headless Locust run against `convserve serve` on loopback (free ports, the
# model_repository/ that `make serve` uses), or against TARGET=host:port when given.
# Reports go to loadtests/results/; fails on any failed request or p99 > SLO_P99_MS.
USERS ?= 4
SPAWN_RATE ?= 4
DURATION ?= 60s
SLO_P99_MS ?= 2000
TARGET ?=
loadtest: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python loadtests/run.py --users $(USERS) --spawn-rate $(SPAWN_RATE) \
		--duration $(DURATION) --slo-p99-ms $(SLO_P99_MS) $(if $(TARGET),--target $(TARGET))

# A real Prometheus on 127.0.0.1:9090 scraping a running `make serve` (gateway :9464, Triton :8002).
observe:
	bash deploy/observe.sh

# A bounded soak of `convserve serve` (it starts one): mixed Classify traffic with 1%
# malformed images, 1% cancelled calls and 1% tiny deadlines; fails on an unexpected
# status code or on RSS/fd growth. SOAK_SECONDS=60 make soak for a short one.
SOAK_SECONDS ?= 600
soak: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python loadtests/soak.py --seconds $(SOAK_SECONDS)

# The decode-path fuzz tests with many more examples than CI's bounded run.
FUZZ_EXAMPLES ?= 20000
fuzz: install
	PATH="$(abspath $(BIN)):$$PATH" CONVSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/python -m pytest -q tests/ops/test_fuzz_decode.py

clean:
	rm -rf $(VENV) .convserve service/_proto/*_pb2*.py service/_proto/*_pb2*.pyi
