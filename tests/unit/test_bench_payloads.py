"""serve_app.bench.payloads: distinct pre-serialised request bodies (JPEG data URIs, short texts, classify)."""

import json

from serve_app.bench import payloads as P


def test_payloads_are_distinct_decodable_jpegs():
    import base64
    import io

    from PIL import Image

    payload = P.make_payload("image", model="m", width=64, height=48, distinct=3, items_per_request=2).prepare()
    bodies = [json.loads(payload.request(i).body) for i in range(3)]
    uris = [u for b in bodies for u in b["input"]]
    assert len(set(uris)) == 6 and all(b["modality"] == "image" and b["model"] == "m" for b in bodies)
    image = Image.open(io.BytesIO(base64.b64decode(uris[0].split(",", 1)[1])))
    assert image.format == "JPEG" and image.size == (64, 48)
    assert payload.request(3).body == payload.request(0).body  # cycles through the pool
    texts = P.short_texts(50)
    assert len(set(texts)) == 50


def test_classify_payload_has_issue_3_shape():
    payload = P.make_payload("classify", model="m", width=32, height=32, distinct=1, labels=5, templates="imagenet")
    request = payload.prepare().request(0)
    body = json.loads(request.body)
    assert request.path == "/v1/classify"
    assert len(body["labels"]) == 5 and body["prompt_templates"] == "imagenet" and len(body["input"]) == 1
    assert body["modality"] == "image"  # plain strings are images only with infinity's `modality`


def test_invalid_every_marks_requests():
    payload = P.TextPayload(model="m", distinct=2, invalid_every=3).prepare()
    kinds = [payload.request(i).kind for i in range(6)]
    assert kinds == ["ok", "ok", "invalid", "ok", "ok", "invalid"]
