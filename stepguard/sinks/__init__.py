"""Sinks: where step reports go (JSON lines, console; TensorBoard and Prometheus: stepguard.integrations)."""

from stepguard.sinks.base import Sink, SinkSet
from stepguard.sinks.console import ConsoleSink
from stepguard.sinks.jsonl import CorruptLineWarning, JsonlSink, iter_jsonl, read_jsonl

__all__ = ["ConsoleSink", "CorruptLineWarning", "JsonlSink", "Sink", "SinkSet", "iter_jsonl", "read_jsonl"]
