"""The baseline: what a user writes in an afternoon. One process, Starlette + open_clip, no batching.

The handler is an `async def` doing its work inline, so requests run one at a time on the event loop; the
images (or texts) of one request are stacked into one forward pass, but requests are never batched
together. It speaks enough of the OpenAI embeddings API for the load generator (infinity's `"modality":
"image"` dialect for images), and answers 400 for inputs it cannot read.

    python -m serve_app.bench.naive_server --model ViT-B-32 --pretrained random --port 8100 --threads 2
"""

import argparse
import base64
import io
import time
from typing import Any


def create_app(model_name: str, pretrained: str | None = None, threads: int | None = None, served_name: str | None = None):
    import open_clip
    import torch
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    if threads:
        torch.set_num_threads(threads)
    weights = None if pretrained in (None, "random") else pretrained
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights)
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    name = served_name or model_name

    def error(message: str, status: int = 400) -> JSONResponse:
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": status}}
        return JSONResponse(body, status_code=status)

    def load_image(value: str) -> Any:
        if value.startswith("data:"):
            value = value.split(",", 1)[1]
        return Image.open(io.BytesIO(base64.b64decode(value)))

    async def embeddings(request: Request) -> JSONResponse:
        try:
            body = await request.json()
            inputs = body["input"]
        except Exception:
            return error("request body must be JSON with an `input`")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs:
            return error("`input` must not be empty")
        try:
            with torch.no_grad():
                if body.get("modality") == "image":
                    batch = torch.stack([preprocess(load_image(x)) for x in inputs])
                    features = model.encode_image(batch, normalize=True)
                else:
                    if any(not isinstance(x, str) or not x for x in inputs):
                        return error("text inputs must be non-empty strings")
                    features = model.encode_text(tokenizer(inputs), normalize=True)
        except Exception as exc:
            return error(f"cannot embed the input: {type(exc).__name__}")
        data = [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(features.tolist())]
        return JSONResponse({
            "object": "list", "data": data, "model": name, "usage": {"prompt_tokens": 0, "total_tokens": 0},
        })

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time())}]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ])


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="open_clip name, local-dir:/path or hf-hub:org/repo")
    parser.add_argument("--pretrained", default=None, help="pretrained tag; 'random' for random weights")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args(argv)
    app = create_app(args.model, args.pretrained, args.threads, args.served_model_name)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
