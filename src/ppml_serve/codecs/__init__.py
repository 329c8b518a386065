"""Tensor encodings: KServe v2 REST (JSON and binary extension) and the queue's record framing."""
