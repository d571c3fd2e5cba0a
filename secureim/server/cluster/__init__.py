"""What crosses server nodes: ``local`` (one process, nobody elsewhere) and ``nats_bus`` (NATS)."""
