"""Request limits checked before the work they protect (no Ray): templates, labels, texts, image budgets,
lone surrogates, and the body-size cap of the ingress's ASGI middleware."""

import asyncio
import json

import pytest
from PIL import Image

from serve_app.config import AppArgs, ImageLimits, RequestLimits
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.imaging import check_request_pixels, probe_image
from serve_app.inputs import ImageInput, TextInput, check_request_budget, collect_inputs
from serve_app.protocol import ClassifyRequest, EmbeddingRequest, RerankRequest
from serve_app.zero_shot import check_labels, check_prompt_count, check_template, prompts, resolve_templates
from tests.conftest import encode, random_image
from tests.unit.test_preprocess import png_header_only


@pytest.mark.parametrize("template", [
    "{{}}{:>20000000}", "{:>2000000000}", "{0}", "{x}", "{!r}", "{!s:>5}", "{.__class__}", "{[0]}", "{} and {}",
    "no slot", "{", "}", "{}}", "{{}}",
])
def test_templates_with_anything_but_one_bare_field_are_refused(template):
    with pytest.raises(InvalidRequest) as info:
        check_template(template, "prompt_templates[3]", 256)
    assert info.value.param == "prompt_templates[3]"


@pytest.mark.parametrize("template", ["{}", "a photo of a {}.", "{{literal}} braces and {}", "{} {{}}"])
def test_templates_with_one_bare_field_pass_and_format_as_before(template):
    check_template(template, "p", 256)
    assert prompts(["cat"], (template,)) == [template.format("cat")]


def test_template_length_and_count_caps():
    with pytest.raises(InvalidRequest, match="characters"):
        check_template("x" * 300 + "{}", "prompt_templates[0]", 256)
    with pytest.raises(InvalidRequest) as info:
        resolve_templates(["{}"] * 3, 2, 256)
    assert info.value.param == "prompt_templates"
    with pytest.raises(InvalidRequest) as info:
        resolve_templates(["ok {}", "x" * 40 + "{}"], 10, 20)
    assert info.value.param == "prompt_templates[1]"
    assert len(resolve_templates("imagenet", 10, 20)) == 80  # open_clip's own, not the client's: not capped


def test_labels_times_templates_and_label_length():
    check_prompt_count(1000, 80, 80_000)
    with pytest.raises(InvalidRequest) as info:
        check_prompt_count(4096, 128, 100_000)
    assert info.value.param == "labels" and "524288" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        check_labels(["ok", "x" * 1001], 10, 1000)
    assert info.value.param == "labels[1]"


def test_text_characters_per_text_and_per_request():
    limits = RequestLimits(max_text_chars=10, max_request_text_chars=25)
    check_request_budget([TextInput("a" * 10, "input[0]"), TextInput("b" * 10, "input[1]")], limits)
    with pytest.raises(InvalidRequest) as info:
        check_request_budget([TextInput("ok", "input[0]"), TextInput("b" * 11, "input[1]")], limits)
    assert info.value.param == "input[1]"
    with pytest.raises(InvalidRequest) as info:
        check_request_budget([TextInput("a" * 10, f"input[{i}]") for i in range(3)], limits)
    assert info.value.param == "input"
    with pytest.raises(InvalidRequest) as info:  # labels count towards the request's characters
        check_request_budget([TextInput("a" * 10, "input[0]")], limits, extra_text_chars=16)
    assert info.value.param == "input"
    with pytest.raises(InvalidRequest) as info:
        check_request_budget([TextInput("q", "query"), TextInput("d" * 30, "documents[0]")],
                             RequestLimits(max_text_chars=40, max_request_text_chars=25))
    assert info.value.param == "query"  # the list's first item names the request field


def test_inline_image_bytes_per_request():
    limits = RequestLimits(max_request_image_bytes=1000)
    small = ImageInput("A" * 1000, "input[0]")  # 750 bytes once decoded
    check_request_budget([small], limits)
    with pytest.raises(PayloadTooLarge) as info:
        check_request_budget([small, ImageInput("A" * 1000, "input[1]")], limits)
    assert info.value.param == "input" and info.value.status_code == 413
    check_request_budget([small, ImageInput("https://h/x.png", "input[1]")], limits)  # fetched: counted later


def test_request_pixels_from_headers_before_decoding():
    limits = ImageLimits(max_image_pixels=4_000_000)
    probed = [probe_image(png_header_only(1800, 1800), f"input[{i}]", limits) for i in range(2)]
    check_request_pixels(probed[:1], ["input[0]"], 6_000_000)
    with pytest.raises(PayloadTooLarge) as info:
        check_request_pixels(probed, ["input[0]", "input[1]"], 6_000_000)
    assert info.value.param == "input" and "input[1]" in info.value.message
    real = probe_image(encode(random_image(30, 20)), "input[0]", limits)
    assert isinstance(real, Image.Image) and real.size == (30, 20)


@pytest.mark.parametrize("body, model, loc", [
    ({"model": "\ud800", "input": "x"}, EmbeddingRequest, "model"),
    ({"input": ["ok", "bad \udfff"]}, EmbeddingRequest, "input"),
    ({"input": [{"text": "\ud800"}]}, EmbeddingRequest, "text"),
    ({"input": "x", "labels": ["cat", "\udc00"]}, ClassifyRequest, "labels"),
    ({"input": "x", "labels": ["cat"], "prompt_templates": ["{}\ud800"]}, ClassifyRequest, "prompt_templates"),
    ({"query": "\ud800", "documents": ["a"]}, RerankRequest, "query"),
    ({"messages": [{"content": [{"type": "image_url", "image_url": {"url": "\ud800"}}]}]}, EmbeddingRequest, "url"),
])
def test_lone_surrogates_are_validation_errors(body, model, loc):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        model.model_validate(json.loads(json.dumps(body)))  # as FastAPI parses JSON: json.loads keeps them
    deepest = max(info.value.errors(), key=lambda e: len(e["loc"]))
    assert loc in deepest["loc"] and "Unicode" in deepest["msg"]
    assert EmbeddingRequest.model_validate({"input": "emoji \U0001F600 caf\u00e9"}).input  # valid pairs pass


def test_collect_inputs_caps_messages_before_building_every_input():
    request = EmbeddingRequest.model_validate({"messages": [{"content": [{"text": "x"}] * 5}] * 3})
    with pytest.raises(InvalidRequest) as info:
        collect_inputs(request, 8)
    assert info.value.param == "messages"


def test_limits_are_configurable_and_documented():
    args = AppArgs.model_validate({"limits": {"max_body_bytes": 2048, "max_text_chars": 77}})
    assert args.limits.max_body_bytes == 2048 and args.limits.max_text_chars == 77
    assert args.limits.max_prompts_per_request == RequestLimits().max_prompts_per_request
    for name, field in RequestLimits.model_fields.items():
        assert field.description, name
    with pytest.raises(ValueError):
        AppArgs.model_validate({"limits": {"no_such_limit": 1}})


# ------------------------------------------------------------------ the ASGI middleware's body cap


async def _call(app, headers: dict[str, str], chunks: list[bytes], path: str = "/v1/embeddings"):
    from serve_app.ingress import EveryRequest

    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    sent: list[dict] = []
    read = 0

    async def receive():
        nonlocal read
        read += 1
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    await EveryRequest(app)(scope, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body or b"null"), read


async def _reading_app(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": json.dumps({"read": len(body)}).encode()})


def test_body_cap_from_content_length_before_reading_and_while_reading(monkeypatch):
    from serve_app import ingress

    monkeypatch.setattr(ingress.GUARD, "max_body_bytes", 100)
    monkeypatch.setattr(ingress.GUARD, "tenancy", None)
    status, body, read = asyncio.run(_call(_reading_app, {"content-length": "101"}, [b"x" * 101]))
    assert status == 413 and read == 0 and body["error"]["code"] == 413
    status, body, read = asyncio.run(_call(_reading_app, {"content-length": "1x"}, [b"x"]))
    assert status == 400
    status, body, _ = asyncio.run(_call(_reading_app, {"transfer-encoding": "chunked"}, [b"x" * 60] * 3))
    assert status == 413 and "100 byte" in body["error"]["message"]
    status, body, _ = asyncio.run(_call(_reading_app, {"transfer-encoding": "chunked"}, [b"x" * 50] * 2))
    assert status == 200 and body == {"read": 100}


def test_a_trickling_body_gets_408_after_the_read_timeout(monkeypatch):
    from serve_app import ingress

    monkeypatch.setattr(ingress.GUARD, "max_body_bytes", 10_000)
    monkeypatch.setattr(ingress.GUARD, "body_read_timeout_s", 0.3)
    monkeypatch.setattr(ingress.GUARD, "tenancy", None)

    async def trickle():
        from serve_app.ingress import EveryRequest

        sent = []

        async def receive():
            await asyncio.sleep(0.1)
            return {"type": "http.request", "body": b"x", "more_body": True}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/", "query_string": b"",
                 "headers": []}
        start = asyncio.get_running_loop().time()
        await EveryRequest(_reading_app)(scope, receive, send)
        return sent[0]["status"], asyncio.get_running_loop().time() - start

    status, elapsed = asyncio.run(trickle())
    assert status == 408 and elapsed < 1.0


def test_a_body_with_too_many_json_values_is_refused_while_it_arrives(monkeypatch):
    from serve_app import ingress

    monkeypatch.setattr(ingress.GUARD, "max_body_bytes", 10_000_000)
    monkeypatch.setattr(ingress.GUARD, "max_json_values", 2000)
    monkeypatch.setattr(ingress.GUARD, "tenancy", None)
    many = b'{"input":[' + b",".join([b"{}"] * 5000) + b"]}"
    status, body, _ = asyncio.run(_call(_reading_app, {"transfer-encoding": "chunked"}, [many[:4000], many[4000:]]))
    assert status == 413 and "JSON values" in body["error"]["message"]
    ordinary = json.dumps({"input": ["a, b, c"] * 300}).encode()  # 300 items, 900 counted: well under
    status, body, _ = asyncio.run(_call(_reading_app, {"transfer-encoding": "chunked"}, [ordinary]))
    assert status == 200 and body == {"read": len(ordinary)}


@pytest.mark.parametrize("body, param", [
    ({"input": [{}] * 5000}, "input"),
    ({"input": ["x"] * 5000}, "input"),
    ({"messages": [{"content": [{"text": "a"}] * 100}] * 100}, "messages"),
    ({"input": []}, "input"),
])
def test_list_lengths_are_checked_before_any_item_is_validated(body, param, monkeypatch):
    from serve_app import protocol

    monkeypatch.setattr(protocol.LIST_LIMITS, "inputs", 2048)
    with pytest.raises(InvalidRequest) as info:
        EmbeddingRequest.model_validate(body)
    assert info.value.param == param


def test_a_long_list_of_bad_items_stops_at_its_first_bad_slice_and_names_the_item():
    from pydantic import ValidationError

    from serve_app.errors import param_from_loc as _param_from_loc

    items = ["ok"] * 100 + [{}] * 1900
    with pytest.raises(ValidationError) as info:
        EmbeddingRequest.model_validate({"input": items})
    errors = info.value.errors()
    assert len(errors) <= 8 + 1  # the slice's first errors (and the `str` branch of `input` itself)
    deepest = max(errors, key=lambda e: len(e["loc"]))
    assert _param_from_loc(("body", *deepest["loc"])) == "input[100]"


def test_token_id_lists_are_refused_without_reading_their_items():
    from serve_app.protocol import TokenIds

    request = EmbeddingRequest.model_validate({"input": ["a", list(range(1_000_000))]})
    assert request.input[1] == TokenIds(1_000_000)
    with pytest.raises(InvalidRequest, match="token-id") as info:
        collect_inputs(request, 2048)
    assert info.value.param == "input[1]"


def test_labels_and_templates_are_bounded_by_the_characters_of_their_prompts():
    from serve_app.zero_shot import check_prompt_chars, prompt_chars

    labels, templates = ["cat", "tabby dog"], ("a photo of a {}.", "{}")
    assert prompt_chars(labels, templates) == sum(map(len, prompts(labels, templates)))
    check_prompt_chars(labels, templates, 100)
    long_templates = tuple("x" * 254 + "{}" for _ in range(128))
    with pytest.raises(InvalidRequest) as info:
        check_prompt_chars(["y" * 83] * 781, long_templates, 6_000_000)
    assert info.value.param == "labels"


def test_response_scores_are_bounded_before_scoring():
    from serve_app.zero_shot import check_scores

    check_scores(2048, 3900, 5, 262_144)
    with pytest.raises(InvalidRequest) as info:
        check_scores(2048, 3900, None, 262_144)
    assert info.value.param == "top_k" and "top_k" in info.value.message


def scan_bomb(repeats: int, size: int = 256) -> bytes:
    """A progressive JPEG of plain grey whose last refinement scan is repeated: a few kilobytes that cost a pass
    over the whole image per repeat."""
    raw = encode(Image.new("RGB", (size, size), (128, 128, 128)), "JPEG", quality=90, progressive=True)
    last_scan = raw[raw.rfind(b"\xff\xda"):-2]
    return raw[:-2] + last_scan * repeats + b"\xff\xd9"


def test_jpeg_scans_are_counted_from_segments_and_bounded_before_decoding():
    from serve_app.imaging import jpeg_scans

    image = random_image(96, 64, seed=4)
    assert jpeg_scans(encode(image, "JPEG", quality=90)) == 1
    assert jpeg_scans(encode(image, "JPEG", quality=90, progressive=True, optimize=True)) == 10
    thumbnail = encode(image, "JPEG", quality=90)  # an APP segment holding a whole JPEG: its scan is not ours
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_app = encode(image, "JPEG", quality=90, progressive=True, extra=app1)
    assert jpeg_scans(with_app) == 10
    bomb = scan_bomb(2000)
    assert len(bomb) < 100_000 and jpeg_scans(bomb) == 2010
    with pytest.raises(InvalidRequest, match="scans") as info:
        probe_image(bomb, "input[2]", ImageLimits())
    assert info.value.param == "input[2]"
    probe_image(scan_bomb(50), "input[0]", ImageLimits())  # 60 scans: within the default of 64
    # FF 00 where a marker is due is no marker: libjpeg skips it and reads on, so the walk must too (a "length"
    # after it would have hidden the scans it jumped over)
    first_scan = bomb.find(b"\xff\xda")
    hidden = bomb[:first_scan] + b"\xff\x00\xff\xff" + bomb[first_scan:]
    assert jpeg_scans(hidden) == 2010


def test_requests_past_the_admission_bound_get_429_in_openai_shape_and_liveness_still_answers(monkeypatch):
    from serve_app import ingress

    monkeypatch.setattr(ingress.GUARD, "tenancy", None)
    monkeypatch.setattr(ingress.GUARD, "max_requests_in_flight", 2)
    monkeypatch.setattr(ingress.GUARD, "in_flight", 0)
    release = None

    async def held(scope, receive, send):
        while (await receive()).get("more_body"):  # the whole body first: then the request counts
            pass
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def scenario():
        nonlocal release
        release = asyncio.Event()
        first = [asyncio.ensure_future(_call(held, {}, [b"{}"])) for _ in range(2)]
        await asyncio.sleep(0.05)
        refused = await _call(held, {}, [b"{}"])
        live = asyncio.ensure_future(_call(_reading_app, {}, [b""], path="/livez"))
        await asyncio.sleep(0.05)
        live_done = live.done()
        release.set()
        return refused, [await f for f in first], live_done, ingress.GUARD.in_flight

    (status, body, read), admitted, live_done, in_flight = asyncio.run(scenario())
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert "overloaded" in body["error"]["message"]
    assert [a[0] for a in admitted] == [200, 200] and live_done and in_flight == 0


def test_a_client_trickling_its_body_holds_no_place_in_admission(monkeypatch):
    from serve_app import ingress

    monkeypatch.setattr(ingress.GUARD, "tenancy", None)
    monkeypatch.setattr(ingress.GUARD, "max_requests_in_flight", 1)
    monkeypatch.setattr(ingress.GUARD, "in_flight", 0)
    monkeypatch.setattr(ingress.GUARD, "body_read_timeout_s", 5.0)
    monkeypatch.setattr(ingress.GUARD, "max_body_bytes", 10_000)

    async def scenario():
        stalled = asyncio.Event()

        async def trickle():
            await stalled.wait()  # never completes its body
            return {"type": "http.request", "body": b"", "more_body": False}

        from serve_app.ingress import EveryRequest

        async def send(message):
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "raw_path": b"/", "query_string": b"",
                 "headers": [(b"content-length", b"5000")]}
        slow = asyncio.ensure_future(EveryRequest(_reading_app)(scope, trickle, send))
        await asyncio.sleep(0.05)
        quick = await _call(_reading_app, {}, [b"{}"])
        slow.cancel()
        return quick

    status, body, _ = asyncio.run(scenario())
    assert status == 200 and body == {"read": 2}


def test_the_admission_bound_defaults_to_three_quarters_of_the_ingress_queue():
    from serve_app.app import _hardening

    assert _hardening(AppArgs(), 256)["max_requests_in_flight"] == 192
    assert _hardening(AppArgs(limits={"max_requests_in_flight": 10}), 256)["max_requests_in_flight"] == 10


def test_a_png_of_many_metadata_chunks_is_refused_before_pillow_reads_them():
    import struct
    import zlib

    from serve_app.imaging import check_png_chunks

    raw = encode(random_image(4, 3, seed=1), "PNG")
    chunk = struct.pack(">I", 0) + b"prVt" + struct.pack(">I", zlib.crc32(b"prVt"))
    padded = raw[:33] + chunk * 80_000 + raw[33:]  # after IHDR: 80,000 empty private chunks, under 1 MB
    with pytest.raises(InvalidRequest, match="chunks") as info:
        probe_image(padded, "input[0]", ImageLimits())
    assert info.value.param == "input[0]"
    check_png_chunks(raw, "input[0]")
    check_png_chunks(raw[:33] + chunk * 100 + raw[33:], "input[0]")  # a hundred text chunks: ordinary
    probe_image(encode(random_image(300, 200, seed=2), "PNG", optimize=True), "input[0]", ImageLimits())


def test_texts_line_breaks_are_bounded_per_request():
    limits = RequestLimits(max_request_text_lines=100)
    check_request_budget([TextInput("a\nb\n" * 25, "input[0]")], limits)
    with pytest.raises(InvalidRequest, match="line breaks") as info:
        check_request_budget([TextInput("x", "input[0]"), TextInput("\n" * 101, "input[1]")], limits)
    assert info.value.param == "input"
    from serve_app.zero_shot import prompt_lines

    assert prompt_lines(["a\nb", "c"], ("{}", "x\n{}")) == 2 * 1 + 2 * 1
