"""Schemathesis hooks for tests/integration/test_schemathesis.py (loaded through SCHEMATHESIS_HOOKS).

The OpenAPI document states every constraint JSON Schema can (serve_app/openapi.py). Two it cannot: an image
field's string must be the bytes of a real image, and all `messages` together hold at most the server's inputs
per request (CLIP_MAX_INPUTS, set by the test). A generated schema-valid request gets a real small PNG in every
image field and its messages' parts cut to that total before it is sent, so that "schema-valid requests are
accepted" is tested on everything else; negative cases are sent as generated.
"""

import base64
import io
import os

import schemathesis
from PIL import Image

_buffer = io.BytesIO()
Image.new("RGB", (8, 6), (200, 30, 90)).save(_buffer, "PNG")
PNG = "data:image/png;base64," + base64.b64encode(_buffer.getvalue()).decode()


def _item(item, strings_are_images: bool):
    if isinstance(item, str):
        return PNG if strings_are_images else item
    if isinstance(item, dict):
        kind = item.get("type")
        if kind == "image_url":
            url = item.get("image_url")
            item["image_url"] = {**url, "url": PNG} if isinstance(url, dict) else PNG
        elif kind != "text" and "image" in item:
            item["image"] = PNG
    return item


def _items(value, strings_are_images: bool):
    if isinstance(value, list):
        return [_item(item, strings_are_images) for item in value]
    return _item(value, strings_are_images)


@schemathesis.hook
def before_call(ctx, case, kwargs):
    if not case.meta or not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return
    body = case.body
    strings_are_images = body.get("modality") == "image"
    if body.get("input") is not None:
        body["input"] = _items(body["input"], strings_are_images)
    room = int(os.environ.get("CLIP_MAX_INPUTS", "2048"))
    messages = body.get("messages") or []
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("content"), list):
            message["content"] = _items(message["content"], False)
    if isinstance(messages, list):
        parts = [len(m["content"]) if isinstance(m, dict) and isinstance(m.get("content"), list) else 1
                 for m in messages]
        while sum(parts) > room and messages:
            last = messages[-1]
            if isinstance(last, dict) and isinstance(last.get("content"), list) and len(last["content"]) > 1:
                last["content"].pop()
                parts[-1] -= 1
            else:
                messages.pop()
                parts.pop()
    if "query" in body:
        body["query"] = _item(body["query"], False)
    if isinstance(body.get("documents"), list):
        body["documents"] = _items(body["documents"], False)
