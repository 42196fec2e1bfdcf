"""The workers (`python -m nimbus.workers`): event consumer, result router, replay consumer and
status manager, started together or a subset by `run`."""
