# Two commands: `make demo` and `make test`. Both create and reuse the environment in .venv/.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test unit integration bench schemas clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[stack,test]'
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(BIN)/streamrec demo

# the suite in TEST_PROCESSES processes (pytest-xdist); tests that need the same session server
# (Apache Kafka, Milvus standalone, the Redis Cluster) share a process (--dist loadgroup)
TEST_PROCESSES ?= 2

test: setup
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadgroup

unit: setup
	$(BIN)/python -m pytest tests/unit

integration: setup
	$(BIN)/python -m pytest tests/integration

bench: setup
	$(BIN)/streamrec bench

schemas: setup
	$(BIN)/streamrec schemas --out schemas/json

clean:
	rm -rf $(VENV) .streamrec reports *.egg-info
