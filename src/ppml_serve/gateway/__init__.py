"""The HTTPS gateway: KServe v2 REST in front of the encrypted queue."""
