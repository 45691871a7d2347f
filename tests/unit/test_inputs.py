"""Every input dialect flattens to the same ordered inputs; bad forms get an InvalidRequest naming the item."""

import pytest
from pydantic import ValidationError

from serve_app.errors import InvalidRequest
from serve_app.inputs import TOKEN_IDS_MESSAGE, ImageInput, TextInput, collect_inputs
from serve_app.protocol import EmbeddingRequest

PNG = "data:image/png;base64,iVBORw0KGgo="


def collect(body: dict, max_inputs: int = 16):
    return collect_inputs(EmbeddingRequest.model_validate(body), max_inputs)


def test_string_and_list_of_strings_are_text():
    assert collect({"input": "a cat"}) == [TextInput("a cat", "input")]
    assert collect({"input": ["a", "b"]}) == [TextInput("a", "input[0]"), TextInput("b", "input[1]")]


def test_modality_image_turns_strings_into_images():
    assert collect({"input": [PNG, "iVBORw0KGgo="], "modality": "image"}) == [
        ImageInput(PNG, "input[0]"),
        ImageInput("iVBORw0KGgo=", "input[1]"),
    ]


def test_openai_content_parts_jina_objects_mixed_in_order():
    body = {
        "input": [
            {"type": "text", "text": "t0"},
            {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}},
            {"text": "t2"},
            {"image": PNG},
            "t4",
            {"type": "image_url", "image_url": PNG},
        ]
    }
    assert collect(body) == [
        TextInput("t0", "input[0]"),
        ImageInput(PNG, "input[1]"),
        TextInput("t2", "input[2]"),
        ImageInput(PNG, "input[3]"),
        TextInput("t4", "input[4]"),
        ImageInput(PNG, "input[5]"),
    ]


def test_vllm_messages_each_part_is_one_input():
    body = {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}, {"type": "text", "text": "x"}]},
            {"role": "user", "content": "plain"},
        ]
    }
    assert collect(body) == [
        ImageInput(PNG, "messages[0].content[0]"),
        TextInput("x", "messages[0].content[1]"),
        TextInput("plain", "messages[1].content"),
    ]


@pytest.mark.parametrize("value", [[1, 2, 3], [[1, 2], [3]], ["ok", [5, 6]]])
def test_token_ids_are_rejected_with_an_explanation(value):
    with pytest.raises(InvalidRequest) as info:
        collect({"input": value})
    assert info.value.message == TOKEN_IDS_MESSAGE
    assert "text" in info.value.message


@pytest.mark.parametrize("url", ["http://example.com/cat.jpg", "https://example.com/cat.jpg", "ftp://x/y"])
def test_image_urls_are_rejected_for_now(url):
    with pytest.raises(InvalidRequest) as info:
        collect({"input": [{"type": "image_url", "image_url": {"url": url}}]})
    assert info.value.param == "input[0]"
    assert "data:" in info.value.message


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": []}, "input"),
        ({}, "input"),
        ({"input": ""}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": ["a"], "messages": [{"content": "b"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"input": ["x"] * 17}, "input"),
    ],
)
def test_empty_too_many_and_conflicting_inputs(body, param):
    with pytest.raises(InvalidRequest) as info:
        collect(body)
    assert info.value.param == param
    assert info.value.status_code == 400


def test_wrong_types_fail_validation():
    for body in ({"input": 5}, {"input": [{"foo": 1}]}, {"input": ["a"], "encoding_format": "int8"}, {"input": [None]}):
        with pytest.raises(ValidationError):
            EmbeddingRequest.model_validate(body)


def test_unknown_top_level_fields_are_ignored_like_openai_compatible_servers():
    request = EmbeddingRequest.model_validate({"input": "a", "task": "retrieval", "normalized": True})
    assert request.input == "a"
