"""The request/reply queue: the broker contract and its Redis Streams implementation."""
