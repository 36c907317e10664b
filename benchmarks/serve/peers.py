"""The servers compared with `capsule serve` in bench.py, each started as its own process:

    python peers.py litserve MODEL_DIR PORT BATCH   LitServe, max_batch_size BATCH
    python peers.py fastapi  MODEL_DIR PORT         a plain FastAPI endpoint (pydantic in/out)
    python peers.py floor    -         PORT         the HTTP floor: a bare ASGI app that parses
                                                    the same JSON body and returns a constant

All run on uvicorn with httptools + uvloop, the same stack as `capsule serve`, and answer the
same JSON (label, index, score, scores) for the same {"inputs": [64 floats]} body.
"""
# no `from __future__ import annotations`: FastAPI must see the local pydantic types

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


def load(model_dir: str):
    import torch

    from torchcapsule.registry.modeldir import read_model_dir
    from torchcapsule.serve.loader import build_module

    md = read_model_dir(model_dir)
    return build_module(md, torch.device("cpu")), md.labels


def litserve(model_dir: str, port: int, batch: int) -> None:
    import litserve as ls

    # LitServe spawns its inference worker: the API class must be importable (module level).
    api = _lit_api_class(ls)(max_batch_size=batch, batch_timeout=0.002 if batch > 1 else 0.0,
                             api_path="/v1/predict")
    api.model_dir = model_dir
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=30)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


def _lit_api_class(ls):
    global LitMLP

    class LitMLP(ls.LitAPI):
        def setup(self, device):
            self.model, self.labels = load(self.model_dir)

        def decode_request(self, request):
            return request["inputs"]

        def batch(self, inputs):
            import torch

            return torch.tensor(inputs, dtype=torch.float32)

        def predict(self, x):
            import torch

            with torch.inference_mode():
                if not isinstance(x, torch.Tensor):  # max_batch_size 1: batch() is not called
                    x = torch.tensor(x, dtype=torch.float32)
                if x.dim() == 1:
                    return self.model(x.unsqueeze(0)).softmax(-1)[0]
                return self.model(x).softmax(-1)

        def unbatch(self, output):
            return list(output)

        def encode_response(self, out):
            scores = out.tolist()
            i = max(range(len(scores)), key=scores.__getitem__)
            return {"label": self.labels[i], "index": i, "score": scores[i], "scores": scores}

    LitMLP.__qualname__ = "LitMLP"
    return LitMLP


try:  # defined at import so LitServe's spawned worker can unpickle it
    import litserve as _ls

    _lit_api_class(_ls)
except ImportError:  # pragma: no cover
    pass


def fastapi(model_dir: str, port: int) -> None:
    import torch
    import uvicorn
    from fastapi import FastAPI
    from pydantic import BaseModel

    model, labels = load(model_dir)

    class PredictRequest(BaseModel):
        inputs: list[float]

    class Prediction(BaseModel):
        label: str
        index: int
        score: float
        scores: list[float]

    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(req: PredictRequest) -> Prediction:
        with torch.inference_mode():
            scores = model(torch.tensor([req.inputs], dtype=torch.float32)).softmax(-1)[0].tolist()
        i = max(range(len(scores)), key=scores.__getitem__)
        return Prediction(label=labels[i], index=i, score=scores[i], scores=scores)

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


def floor(port: int) -> None:
    import uvicorn

    reply = json.dumps({"label": "3", "index": 3, "score": 0.9, "scores": [0.01] * 10}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        json.loads(body)
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": reply})

    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False, lifespan="off")


if __name__ == "__main__":
    kind, model_dir, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if kind == "litserve":
        litserve(model_dir, port, int(sys.argv[4]))
    elif kind == "fastapi":
        fastapi(model_dir, port)
    elif kind == "floor":
        floor(port)
    else:
        sys.exit(f"unknown peer {kind!r}")
