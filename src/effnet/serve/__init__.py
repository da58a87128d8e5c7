"""`effnet serve`: effnet modules online, on the KServe Python SDK, with TF Serving's V1 REST API and the Open
Inference Protocol (V2, REST and gRPC), dynamic batching, limits and metrics. See docs/serving.md.

    inputs.py     request parsing and validation (V1 bodies, V2 InferRequests)
    batching.py   the dynamic batcher
    model.py      EffnetModel, the kserve.Model for one effnet module
    app.py        what we add to the SDK's FastAPI app (413, 503/504, response counts)
    metrics.py    our Prometheus metrics
    command.py    the click command and the ModelServer
    ray_serve.py  --replicas N: the same model as a Ray Serve deployment
"""
