# Every target installs what it needs first (scripts/bootstrap.sh creates .venv).
PY := .venv/bin/python

.PHONY: run test check lint types proto services-up services-down clean

run:            ## all-in-one Nimbus on the embedded engine
	bash scripts/run.sh

test:           ## the whole suite, starting the real Kafka and Redis itself
	bash scripts/test.sh

lint:
	bash scripts/bootstrap.sh
	$(PY) -m ruff check nimbus tests scripts
	$(PY) -m ruff format --check nimbus tests scripts

types:
	bash scripts/bootstrap.sh
	$(PY) -m mypy

check: lint types test

proto:          ## regenerate nimbus/proto_gen from protocols/
	bash scripts/bootstrap.sh
	PYTHON=$(PY) bash scripts/gen_proto.sh

services-up:
	bash scripts/services.sh up

services-down:
	bash scripts/services.sh down

clean:
	bash scripts/services.sh down || true
	rm -rf .local .venv .pytest_cache .mypy_cache .ruff_cache
