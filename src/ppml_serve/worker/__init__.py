"""The inference worker: consume, batch, open, infer, seal, reply, ack."""
