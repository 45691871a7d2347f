"""Turns every input dialect of a request into one flat, ordered list of text and image inputs.

Each input keeps `param` (e.g. `input[3]`) so that an error names the exact item that caused it.
"""

from dataclasses import dataclass
from typing import Protocol

from serve_app.errors import InvalidRequest
from serve_app.protocol import (
    ChatMessage,
    ImagePart,
    InputItem,
    JinaImage,
    JinaText,
    TextPart,
)


@dataclass(frozen=True)
class TextInput:
    text: str
    param: str


@dataclass(frozen=True)
class ImageInput:
    """`data` is a `data:` URI or bare base64; decoding happens in the preprocessing pool."""

    data: str
    param: str


Input = TextInput | ImageInput

TOKEN_IDS_MESSAGE = (
    "token-id arrays are not supported: this server embeds text and images, so send text as strings "
    "(CLIP tokenizes them itself)"
)


def image_input(value: str, param: str) -> ImageInput:
    """Validates the form of an image reference; its bytes are checked when decoded."""
    if not value:
        raise InvalidRequest("an image must be a data: URI or base64, got an empty string", param=param)
    head = value[:16].lower()
    if head.startswith(("http://", "https://")):
        raise InvalidRequest(
            "image URLs are not supported yet: send the image inline as a data: URI "
            "(data:image/jpeg;base64,...) or as bare base64",
            param=param,
        )
    if "://" in value[:32]:
        raise InvalidRequest("unsupported image reference: send a data: URI or bare base64", param=param)
    return ImageInput(value, param)


def text_input(value: str, param: str) -> TextInput:
    if not value:
        raise InvalidRequest("text inputs must not be empty strings", param=param)
    return TextInput(value, param)


def input_from_item(item: InputItem, param: str, strings_are_images: bool = False) -> Input:
    if isinstance(item, str):
        return image_input(item, param) if strings_are_images else text_input(item, param)
    if isinstance(item, (TextPart, JinaText)):
        return text_input(item.text, param)
    if isinstance(item, ImagePart):
        url = item.image_url if isinstance(item.image_url, str) else item.image_url.url
        return image_input(url, param)
    if isinstance(item, JinaImage):
        return image_input(item.image, param)
    # ints and lists of ints: token ids
    raise InvalidRequest(TOKEN_IDS_MESSAGE, param=param)


def _from_messages(messages: list[ChatMessage]) -> list[Input]:
    inputs: list[Input] = []
    for m, message in enumerate(messages):
        if isinstance(message.content, str):
            inputs.append(text_input(message.content, f"messages[{m}].content"))
            continue
        for p, part in enumerate(message.content):
            inputs.append(input_from_item(part, f"messages[{m}].content[{p}]", strings_are_images=False))
    return inputs


class HasInputs(Protocol):
    """The input fields that /v1/embeddings and /v1/classify share."""

    input: str | list[InputItem] | None
    modality: str | None
    messages: list[ChatMessage] | None


def collect_inputs(request: HasInputs, max_inputs: int) -> list[Input]:
    """All inputs of a request, in order; raises InvalidRequest naming the first bad one."""
    if request.input is not None and request.messages is not None:
        raise InvalidRequest("send either `input` or `messages`, not both", param="messages")
    strings_are_images = request.modality == "image"
    if request.messages is not None:
        inputs = _from_messages(request.messages)
        param = "messages"
    elif request.input is None:
        raise InvalidRequest("`input` is required", param="input")
    elif isinstance(request.input, str):
        inputs = [input_from_item(request.input, "input", strings_are_images)]
        param = "input"
    else:
        if request.input and all(isinstance(i, int) for i in request.input):
            raise InvalidRequest(TOKEN_IDS_MESSAGE, param="input")
        check_count(len(request.input), max_inputs, "input")
        inputs = [input_from_item(item, f"input[{i}]", strings_are_images) for i, item in enumerate(request.input)]
        param = "input"
    check_count(len(inputs), max_inputs, param)
    return inputs


def check_count(count: int, max_inputs: int, param: str) -> None:
    """A list field must be non-empty and within its per-request cap."""
    if count == 0:
        raise InvalidRequest(f"`{param}` must contain at least one item", param=param)
    if count > max_inputs:
        raise InvalidRequest(
            f"`{param}` has {count} items; this server accepts at most {max_inputs} per request", param=param
        )
