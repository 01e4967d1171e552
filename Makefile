# The two entry points of the README. Each one sets up everything it needs on
# a fresh machine: the virtual environment, the local servers, topics and the
# Cassandra schema.
FEEDBEAM := .venv/bin/feedbeam
PYTEST_ARGS ?=

.PHONY: demo test bootstrap stack down

bootstrap:
	@bash infra/bootstrap.sh

stack: bootstrap
	$(FEEDBEAM) infra up --with-flink
	$(FEEDBEAM) topics create
	$(FEEDBEAM) migrate

# README command 1: the whole system, as far as it exists, on the local stack.
demo: bootstrap
	$(FEEDBEAM) demo

# README command 2: the layering contract, then unit and integration tests
# against the real servers, then (for the whole suite) the oracle tests again on
# the cluster topology, which the cluster fixture starts beside the single stack.
test: stack
	.venv/bin/lint-imports
	.venv/bin/python -m pytest $(PYTEST_ARGS)
	@if [ -z "$(PYTEST_ARGS)" ]; then \
	  .venv/bin/python -m pytest -m cluster tests/integration/test_cluster.py; fi

down: bootstrap
	$(FEEDBEAM) infra down
