"""Sinks: where step reports go (JSON lines, console; TensorBoard and Prometheus in stepguard.integrations)."""
