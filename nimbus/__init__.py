"""Nimbus: a real-time event system for mobile and IoT clients (gRPC, Kafka, Redis) on trio."""

__version__ = "0.1.0"
