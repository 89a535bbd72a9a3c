"""webhook-dispatcher: entity-change events from Kafka to signed HTTPS webhook POSTs."""

__version__ = "0.1.0"
