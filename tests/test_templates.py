import pytest

from brainforge.data.templates import IGNORE_INDEX, chat_format, render_with_spans, tokenize_conversation
from brainforge.errors import DataError

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


def trained_text(tokenizer, example):
    return tokenizer.decode([t for t, l in zip(example.input_ids, example.labels) if l != IGNORE_INDEX])


def test_chatml_labels_only_assistant_turns_with_end_of_turn(tokenizer):
    fmt = chat_format("chatml", tokenizer)
    example = tokenize_conversation(tokenizer, fmt, CONVERSATION, max_length=512)
    assert trained_text(tokenizer, example) == "4<|im_end|>6, of course.<|im_end|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Every im_end that closes a user/system turn is ignored; both assistant ones are trained.
    trained_ends = [l for t, l in zip(example.input_ids, example.labels) if t == im_end and l != IGNORE_INDEX]
    assert len(trained_ends) == 2
    assert example.input_ids.count(im_end) == 5  # system, user, assistant, user, assistant
    # Prompt tokens, the system prompt and the role headers are never trained.
    first_trained = next(i for i, l in enumerate(example.labels) if l != IGNORE_INDEX)
    assert tokenizer.decode(example.input_ids[:first_trained]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("name", ["alpaca", "llama2", "mistral"])
def test_other_formats_train_answer_and_eos(tokenizer, name):
    fmt = chat_format(name, tokenizer)
    example = tokenize_conversation(tokenizer, fmt, CONVERSATION[:2], max_length=512)
    text = trained_text(tokenizer, example)
    assert "4" in text and text.endswith(tokenizer.eos_token)
    assert "2+2" not in text
    assert example.labels[-1] == tokenizer.eos_token_id or tokenizer.decode(example.input_ids[-1:]).strip() == ""


def test_alpaca_layout(tokenizer):
    fmt = chat_format("alpaca", tokenizer)
    text, spans = render_with_spans(tokenizer, fmt, CONVERSATION[:2])
    assert "### Instruction:\nWhat is 2+2?" in text and "### Response:\n4" in text
    assert text[spans[0][0] : spans[0][1]] == "4" + tokenizer.eos_token


def test_truncation_keeps_start(tokenizer):
    fmt = chat_format("chatml", tokenizer)
    full = tokenize_conversation(tokenizer, fmt, CONVERSATION, max_length=10_000)
    cut = tokenize_conversation(tokenizer, fmt, CONVERSATION, max_length=20)
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]


def test_bad_roles_are_named(tokenizer):
    fmt = chat_format("chatml", tokenizer)
    with pytest.raises(DataError, match="message 1 has role 'robot'"):
        render_with_spans(tokenizer, fmt, [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}])
    with pytest.raises(DataError, match="only the first message"):
        render_with_spans(tokenizer, fmt, [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


TOOL_CONVERSATION = [
    {"role": "user", "content": "What is 12*34?"},
    {"role": "assistant", "content": '<tool_call>{"name": "calculator", "arguments": {"expression": "12*34"}}</tool_call>'},
    {"role": "tool", "content": "408"},
    {"role": "assistant", "content": "408"},
]


def test_tool_turns_render_as_their_own_turn_and_are_not_trained(tokenizer):
    """Agent SFT data (brainforge traces export) holds tool results as `tool` turns."""
    fmt = chat_format("chatml", tokenizer)
    example = tokenize_conversation(tokenizer, fmt, TOOL_CONVERSATION, max_length=512)
    text = tokenizer.decode(example.input_ids)
    assert "<|im_start|>tool\n408<|im_end|>" in text
    assert trained_text(tokenizer, example) == (TOOL_CONVERSATION[1]["content"] + "<|im_end|>408<|im_end|>")


@pytest.mark.parametrize("name", ["alpaca", "llama2", "mistral"])
def test_tool_turns_in_a_template_without_role_names_are_refused(tokenizer, name):
    with pytest.raises(DataError, match="message 2 is a tool result.*output_format: chatml"):
        tokenize_conversation(tokenizer, chat_format(name, tokenizer), TOOL_CONVERSATION, max_length=512)
