"""Sinks: where step reports go (JSON lines, console; TensorBoard and Prometheus: stepguard.integrations)."""
