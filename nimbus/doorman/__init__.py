"""The doorman (`python -m nimbus.server`): the gRPC edge (`server`, `edge`, `tls`, `auth`) and the
trio side that owns a pod's sessions (`pod`)."""
