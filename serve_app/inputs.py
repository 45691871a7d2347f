"""Turns every input dialect of a request into one flat, ordered list of text and image inputs.

Each input keeps `param` (e.g. `input[3]`) so that an error names the exact item that caused it.
"""

from dataclasses import dataclass
from typing import Protocol

from serve_app.config import ImageURLPolicy, RequestLimits
from serve_app.errors import InvalidRequest, PayloadTooLarge
from serve_app.protocol import (
    ChatMessage,
    ImagePart,
    InputItem,
    JinaImage,
    JinaText,
    TextPart,
    check_count,
)


@dataclass(frozen=True)
class TextInput:
    text: str
    param: str


@dataclass(frozen=True)
class ImageInput:
    """`data` is a `data:` URI, bare base64, or an http(s) URL where `image_url_policy` allows them;
    fetching and decoding happen in the preprocessing pool."""

    data: str
    param: str

    @property
    def is_url(self) -> bool:
        return is_url(self.data)


Input = TextInput | ImageInput

MAX_URL_CHARS = 4096

TOKEN_IDS_MESSAGE = (
    "token-id arrays are not supported: this server embeds text and images, so send text as strings "
    "(CLIP tokenizes them itself)"
)


def is_url(value: str) -> bool:
    return value[:8].lower().startswith(("http://", "https://"))


def image_input(value: str, param: str, url_policy: ImageURLPolicy = "off") -> ImageInput:
    """Validates the form of an image reference; its bytes are checked when decoded (URLs: when fetched,
    under the policy, in the preprocessing pool)."""
    if not value:
        raise InvalidRequest("an image must be a data: URI or base64, got an empty string", param=param)
    if is_url(value) and url_policy != "off":
        if len(value) > MAX_URL_CHARS:
            raise InvalidRequest(f"image URL is longer than {MAX_URL_CHARS} characters", param=param)
        return ImageInput(value, param)
    if is_url(value):
        raise InvalidRequest(
            "image URLs are not enabled on this server (image_url_policy is off): send the image inline as a "
            "data: URI (data:image/jpeg;base64,...) or as bare base64",
            param=param,
        )
    if "://" in value[:32]:
        raise InvalidRequest("unsupported image reference: send a data: URI or bare base64", param=param)
    return ImageInput(value, param)


def text_input(value: str, param: str) -> TextInput:
    if not value:
        raise InvalidRequest("text inputs must not be empty strings", param=param)
    return TextInput(value, param)


def input_from_item(
    item: InputItem, param: str, strings_are_images: bool = False, url_policy: ImageURLPolicy = "off"
) -> Input:
    if isinstance(item, str):
        return image_input(item, param, url_policy) if strings_are_images else text_input(item, param)
    if isinstance(item, (TextPart, JinaText)):
        return text_input(item.text, param)
    if isinstance(item, ImagePart):
        url = item.image_url if isinstance(item.image_url, str) else item.image_url.url
        return image_input(url, param, url_policy)
    if isinstance(item, JinaImage):
        return image_input(item.image, param, url_policy)
    # ints and lists of ints: token ids
    raise InvalidRequest(TOKEN_IDS_MESSAGE, param=param)


def _from_messages(messages: list[ChatMessage], max_inputs: int, url_policy: ImageURLPolicy) -> list[Input]:
    inputs: list[Input] = []
    for m, message in enumerate(messages):
        if isinstance(message.content, str):
            inputs.append(text_input(message.content, f"messages[{m}].content"))
            continue
        check_count(len(inputs) + len(message.content), max_inputs, "messages")
        for p, part in enumerate(message.content):
            inputs.append(input_from_item(part, f"messages[{m}].content[{p}]", False, url_policy))
    return inputs


class HasInputs(Protocol):
    """The input fields that /v1/embeddings and /v1/classify share."""

    input: str | list[InputItem] | None
    modality: str | None
    messages: list[ChatMessage] | None


def collect_inputs(request: HasInputs, max_inputs: int, url_policy: ImageURLPolicy = "off") -> list[Input]:
    """All inputs of a request, in order; raises InvalidRequest naming the first bad one."""
    if request.input is not None and request.messages is not None:
        raise InvalidRequest("send either `input` or `messages`, not both", param="messages")
    strings_are_images = request.modality == "image"
    if request.messages is not None:
        check_count(len(request.messages), max_inputs, "messages")
        inputs = _from_messages(request.messages, max_inputs, url_policy)
        param = "messages"
    elif request.input is None:
        raise InvalidRequest("`input` is required", param="input")
    elif isinstance(request.input, str):
        inputs = [input_from_item(request.input, "input", strings_are_images, url_policy)]
        param = "input"
    else:
        if request.input and all(isinstance(i, int) for i in request.input):
            raise InvalidRequest(TOKEN_IDS_MESSAGE, param="input")
        check_count(len(request.input), max_inputs, "input")
        inputs = [
            input_from_item(item, f"input[{i}]", strings_are_images, url_policy) for i, item in enumerate(request.input)
        ]
        param = "input"
    check_count(len(inputs), max_inputs, param)
    return inputs


def check_request_budget(inputs: list[Input], limits: RequestLimits, extra_text_chars: int = 0,
                         extra_text_lines: int = 0) -> None:
    """Characters per text and per request, and inline image bytes per request, before any work is sent.

    A text's characters bound the tokenizer's work (its cleaning is linear in them; serve_app/tokenizing.py
    stops at the model's context). Inline images' bytes are estimated
    from their base64 length (3/4 of it); fetched images are counted as they stream in the preprocessor.
    """
    text_chars = extra_text_chars
    text_lines = extra_text_lines
    image_bytes = 0
    for item in inputs:
        if isinstance(item, TextInput):
            if len(item.text) > limits.max_text_chars:
                raise InvalidRequest(
                    f"text has {len(item.text)} characters; the limit is {limits.max_text_chars} (CLIP reads "
                    "only a text's first 77 tokens)",
                    param=item.param,
                )
            text_chars += len(item.text)
            text_lines += item.text.count("\n")
        elif not item.is_url:
            image_bytes += len(item.data) * 3 // 4
    if text_chars > limits.max_request_text_chars:
        raise InvalidRequest(
            f"the request's texts have {text_chars} characters together; the limit is "
            f"{limits.max_request_text_chars}",
            param=_list_param(inputs),
        )
    if text_lines > limits.max_request_text_lines:
        raise InvalidRequest(
            f"the request's texts have {text_lines} line breaks together; the limit is "
            f"{limits.max_request_text_lines}",
            param=_list_param(inputs),
        )
    if image_bytes > limits.max_request_image_bytes:
        raise PayloadTooLarge(
            f"the request's images are about {image_bytes} bytes together; the limit is "
            f"{limits.max_request_image_bytes}",
            param=_list_param(inputs),
        )


def _list_param(inputs: list[Input]) -> str:
    """The request field that holds the inputs: `input`, `messages`, or `documents` (rerank)."""
    first = inputs[0].param if inputs else "input"
    for name in ("messages", "documents", "input"):
        if first.startswith(name):
            return name
    return first.split("[", 1)[0].split(".", 1)[0]
