"""For operators: Prometheus metrics and process counters, the HTTP edge that serves them, the
live web view and the read-only admin command."""
