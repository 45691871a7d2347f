"""The OpenAPI document says what the service really requires.

FastAPI derives the request schemas from the pydantic wire types, which are deliberately lenient where a
clear error beats a generic one (token ids are parsed only to be refused by name) and cannot know the limits
a deployment sets. `refine` states what the service checks: non-empty texts within `max_text_chars`,
non-blank labels, lists of at least one and at most the configured number of items, `input` or `messages`,
the served model names, and which keys make an input object an image or a text. What no JSON Schema can
state (an image's bytes must decode as an image of an allowed format; `modality: "image"` makes plain strings
images; `dimensions` must equal the chosen model's size) is said in the descriptions.
"""

from typing import Any

from serve_app.protocol import LIST_LIMITS

IMAGE_NOTE = (
    "an image: a data: URI (data:image/<png|jpeg|gif|webp|bmp>;base64,...) or bare base64 of an image file, or "
    "an http(s) URL where the server's image_url_policy allows one"
)


def _text(max_chars: int) -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "maxLength": max_chars}


def _image() -> dict[str, Any]:
    return {"type": "string", "minLength": 1, "description": IMAGE_NOTE}


def _not_keys(*keys: str) -> dict[str, Any]:
    return {"not": {"anyOf": [{"required": [key]} for key in keys]}}


def _objects(max_chars: int) -> dict[str, dict[str, Any]]:
    """Input objects, each closed to the keys that would make the server read it as another kind (it reads
    `type` first, then the presence of `image`, then `text`)."""
    not_a_part = {"not": {"required": ["type"], "properties": {"type": {"enum": ["text", "image_url"]}}}}
    return {
        "TextPart": {"type": "object", "required": ["type", "text"],
                     "properties": {"type": {"const": "text"}, "text": _text(max_chars)}},
        "ImagePart": {"type": "object", "required": ["type", "image_url"],
                      "properties": {"type": {"const": "image_url"},
                                     "image_url": {"anyOf": [{"$ref": "#/components/schemas/ImageURL"}, _image()]}}},
        "JinaImage": {"type": "object", "required": ["image"], "properties": {"image": _image()},
                      "allOf": [not_a_part]},
        "JinaText": {"type": "object", "required": ["text"], "properties": {"text": _text(max_chars)},
                     "allOf": [not_a_part, _not_keys("image")]},
        "ImageURL": {"type": "object", "required": ["url"],
                     "properties": {"url": _image(), "detail": {"type": ["string", "null"]}}},
    }


def _items(max_chars: int) -> dict[str, Any]:
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in ("TextPart", "ImagePart", "JinaImage", "JinaText")]
    return {"anyOf": [_text(max_chars), *refs]}


def _list(item: dict[str, Any], max_items: int) -> dict[str, Any]:
    return {"type": "array", "items": item, "minItems": 1, "maxItems": max_items}


def refine(document: dict[str, Any], models: dict[str, int], max_text_chars: int,
           max_template_chars: int = 256) -> dict[str, Any]:
    """`document` (FastAPI's) with the request schemas as the service checks them."""
    schemas = document["components"]["schemas"]
    schemas.update(_objects(max_text_chars))
    items = _items(max_text_chars)
    inputs = {"anyOf": [_text(max_text_chars), _list(items, LIST_LIMITS.inputs)],
              "description": f"texts, or images as input objects (with modality 'image', strings are {IMAGE_NOTE})"}
    model = {"anyOf": [{"type": "string", "enum": list(models)}, {"type": "null"}],
             "description": "a served model (GET /v1/models); omitted or null: the first"}
    message = schemas["ChatMessage"]
    message["properties"]["content"] = {"anyOf": [
        _text(max_text_chars), _list({"anyOf": items["anyOf"][1:]}, LIST_LIMITS.inputs)]}
    messages = {"type": "array", "items": {"$ref": "#/components/schemas/ChatMessage"}, "minItems": 1,
                "maxItems": LIST_LIMITS.inputs,
                "description": "vLLM's dialect; all messages' content parts count against the inputs' limit"}
    # exactly one of `input` and `messages`, the other absent or null
    def absent(key: str) -> dict[str, Any]:
        return {"anyOf": [{"not": {"required": [key]}}, {"properties": {key: {"type": "null"}}}]}

    def present(key: str) -> dict[str, Any]:
        return {"required": [key], "properties": {key: {"not": {"type": "null"}}}}

    one_of_input = {"anyOf": [{"allOf": [present("input"), absent("messages")]},
                              {"allOf": [present("messages"), absent("input")]}]}
    for name in ("EmbeddingRequest", "ClassifyRequest"):
        request = schemas[name]
        request["properties"]["input"] = {"anyOf": [inputs, {"type": "null"}]}
        request["properties"]["messages"] = {"anyOf": [messages, {"type": "null"}]}
        request["properties"]["model"] = model
        request.setdefault("allOf", []).append(one_of_input)
    classify = schemas["ClassifyRequest"]
    # not blank: one character that is not whitespace as Python's str.isspace() has it (the server's check)
    not_blank = r"[^\t-\r\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
    classify["properties"]["labels"] = _list({**_text(max_text_chars), "pattern": not_blank}, LIST_LIMITS.labels)
    # exactly one bare {}, every other brace doubled
    template = {"type": "string", "maxLength": max_template_chars,
                "pattern": r"^([^{}]|\{\{|\}\})*\{\}([^{}]|\{\{|\}\})*$"}
    templates = _list(template, LIST_LIMITS.templates)
    classify["properties"]["prompt_templates"] = {
        "anyOf": [templates, {"const": "imagenet"}, {"type": "null"}],
        "description": "strings with exactly one bare '{}' (other braces doubled), or 'imagenet'"}
    classify["properties"]["top_k"] = {"type": ["integer", "null"], "minimum": 1}
    embeddings = schemas["EmbeddingRequest"]
    embeddings["properties"]["dimensions"] = {
        "type": ["integer", "null"],
        "description": "only the chosen model's own embedding size (CLIP vectors cannot be cut)"}
    # `dimensions`, when set, is the size of the model named (or of the first, when none is)
    first = next(iter(models))
    size_of = [{"properties": {"model": {"const": name}, "dimensions": {"enum": [size, None]}},
                "required": ["model"]} for name, size in models.items()]
    size_of.append({"properties": {"model": {"type": "null"}, "dimensions": {"enum": [models[first], None]}}})
    size_of.append({"not": {"required": ["model"]}, "properties": {"dimensions": {"enum": [models[first], None]}}})
    embeddings.setdefault("allOf", []).append({"anyOf": size_of})
    rerank = schemas["RerankRequest"]
    rerank["properties"]["model"] = model
    rerank["properties"]["query"] = items
    rerank["properties"]["documents"] = _list(items, LIST_LIMITS.inputs)
    rerank["properties"]["top_n"] = {"type": ["integer", "null"], "minimum": 1}
    return document
