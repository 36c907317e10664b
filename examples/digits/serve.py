"""A custom handler for the digits model: takes an 8x8 image, answers the top-k digits.

Run it (after the train stage wrote models/digits):

    capsule serve models/digits --handler serve.py:DigitsHandler
    # or: python serve.py models/digits
    curl -s localhost:8080/v1/predict -H 'content-type: application/json' \
         -d '{"image": [[0,0,5,13,9,1,0,0], ... 8 rows of 8 pixels 0-16 ...]}'

or name it in capsule.yaml (`serve: {handler: serve.py:DigitsHandler}`). The Request and
Response types below are what the server validates against (422 names the bad field) and
what /openapi.json shows.
"""
from __future__ import annotations

from typing import Annotated

import msgspec
import torch

from torchcapsule.serve import Handler, InputError

Row = Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=16)]], msgspec.Meta(min_length=8, max_length=8)]


class DigitsRequest(msgspec.Struct, forbid_unknown_fields=True):
    """An 8x8 grey image, pixels 0 (white) to 16 (black), as in sklearn's digits."""

    image: Annotated[list[Row], msgspec.Meta(min_length=8, max_length=8)]


class Guess(msgspec.Struct):
    digit: str
    probability: float


class DigitsResponse(msgspec.Struct):
    guesses: list[Guess]


class DigitsHandler(Handler):
    """The three likeliest digits for one image."""

    Request = DigitsRequest
    Response = DigitsResponse

    def setup(self, device) -> None:
        super().setup(device)  # builds model.py + verified model.safetensors on `device`
        self.labels = self.meta.get("labels") or [str(i) for i in range(10)]

    def validate(self, request: DigitsRequest) -> None:
        if not any(p for row in request.image for p in row):
            raise InputError("the image is blank", "$.image")

    def preprocess(self, request: DigitsRequest) -> torch.Tensor:
        x = torch.tensor(request.image, dtype=torch.float32).reshape(64)
        return x.to(self.device)

    def predict(self, batch: torch.Tensor) -> torch.Tensor:
        return self.module(batch).softmax(dim=-1)

    def postprocess(self, output: torch.Tensor) -> DigitsResponse:
        probs, idx = output.topk(3)
        return DigitsResponse([Guess(self.labels[i], round(p, 4)) for p, i in zip(probs.tolist(), idx.tolist())])

    def example(self) -> DigitsRequest:
        zero = [[0, 0, 5, 13, 9, 1, 0, 0], [0, 0, 13, 15, 10, 15, 5, 0], [0, 3, 15, 2, 0, 11, 8, 0],
                [0, 4, 12, 0, 0, 8, 8, 0], [0, 5, 8, 0, 0, 9, 8, 0], [0, 4, 11, 0, 1, 12, 7, 0],
                [0, 2, 14, 5, 10, 12, 0, 0], [0, 0, 6, 13, 10, 0, 0, 0]]
        return DigitsRequest(image=zero)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    from torchcapsule.serve.server import ServerOptions, serve

    here = Path(__file__).resolve().parent
    model = sys.argv[1] if len(sys.argv) > 1 else str(here / "models" / "digits")
    serve(ServerOptions(model=str(Path(model).resolve()), handler=f"{Path(__file__).resolve()}:DigitsHandler"))
