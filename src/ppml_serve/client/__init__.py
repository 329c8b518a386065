"""Python client for ppml-serve (and any KServe v2 server), sync and async, over HTTPS.

    from ppml_serve.client import Client
    with Client("https://127.0.0.1:8443", api_key=..., ca_file=".ppml-serve/ca.pem") as client:
        outputs = client.infer("demo", images)      # {"probabilities": ndarray}

Tensors travel with the binary extension, never as JSON number lists.
"""

from ppml_serve.client.http import AsyncClient, Client, ClientError

__all__ = ["AsyncClient", "Client", "ClientError"]
