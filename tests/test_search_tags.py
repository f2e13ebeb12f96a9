"""The Search-R1 tag language: the first action of a turn, the last answer, the observation
blocks that count as retrieved, and the legal order of a transcript."""

import pytest

from brainforge.reasoning.tags import SearchTags, blocks, last_answer, parse_action, retrieved_blocks, search_queries, structure_valid

CUSTOM = SearchTags(think="reason", search="lookup", observation="information", answer="final")


@pytest.mark.parametrize("text, kind, content", [
    ("<think>need the capital</think> <search> capital of Bhutan </search>", "search", "capital of Bhutan"),
    ("<think>I know it</think><answer> Thimphu </answer>", "answer", "Thimphu"),
    # first action wins when both appear, whichever comes first
    ("<search>capital of Bhutan</search> <answer>Thimphu</answer>", "search", "capital of Bhutan"),
    ("<answer>Thimphu</answer> <search>capital of Bhutan</search>", "answer", "Thimphu"),
    ("some words <answer>\nmulti\nline\n</answer>", "answer", "multi\nline"),
    # a tag mentioned inside a closed think block is not an action
    ("<think>maybe I should <search> it, or <answer> it</think><search>Bhutan capital</search>", "search", "Bhutan capital"),
    ("<think>no <answer>guess</answer> yet</think><search>Bhutan capital</search>", "search", "Bhutan capital"),
    # a think block left open (the sampler stopped at the action's closing tag) hides nothing
    ("<think>I will look it up <search>Bhutan capital</search>", "search", "Bhutan capital"),
])
def test_parse_action_valid(text, kind, content):
    action = parse_action(text)
    assert (action.kind, action.content, action.reason) == (kind, content, "")


@pytest.mark.parametrize("text, reason", [
    ("<think>hmm</think> I am not sure", "no <search> or <answer> block"),
    ("", "no <search> or <answer> block"),
    ("<think>never closed", "no <search> or <answer> block"),
    ("<search>capital of Bhutan", "<search> was not closed with </search>"),
    ("<answer>Thimphu", "<answer> was not closed with </answer>"),
    ("<search>capital</answer>", "<search> was not closed with </search>"),
    ("<search>   </search>", "empty <search> block"),
    ("<answer>\n</answer>", "empty <answer> block"),
    ("<Search>case matters</Search>", "no <search> or <answer> block"),
    ("<think>only talk of <search>x</search> inside</think>", "no <search> or <answer> block"),
])
def test_parse_action_invalid(text, reason):
    action = parse_action(text)
    assert (action.kind, action.content, action.reason) == ("invalid", "", reason)


def test_custom_tag_names():
    assert parse_action("<reason>x</reason><lookup> Bhutan </lookup>", CUSTOM).content == "Bhutan"
    assert parse_action("<search>Bhutan</search>", CUSTOM).kind == "invalid"  # default names are plain text here
    transcript = "<reason>x</reason><lookup>Bhutan</lookup>\n<information>Thimphu is the capital</information><final>Thimphu</final>"
    assert structure_valid(transcript, CUSTOM)
    assert not structure_valid(transcript)
    assert last_answer(transcript, CUSTOM) == "Thimphu" and last_answer(transcript) is None
    assert retrieved_blocks(transcript, CUSTOM) == ["Thimphu is the capital"]
    assert search_queries(transcript, CUSTOM) == ["Bhutan"]


def test_blocks_in_order():
    text = "<think>a</think><search>q</search><context>c</context><answer>x</answer>"
    assert [(name, content) for name, content, _, _ in blocks(text)] == [("think", "a"), ("search", "q"), ("context", "c"), ("answer", "x")]


@pytest.mark.parametrize("text, expected", [
    ("<answer>Paro</answer> <answer> Thimphu </answer>", "Thimphu"),
    ("<answer>Paro</answer> <answer>Thimphu", "Paro"),  # an unclosed last answer is ignored
    ("<answer>Thimphu", None),
    ("<think>no answer</think>", None),
    ("<context><answer>Paro</answer></context>", None),  # inside an observation: not the policy's answer
])
def test_last_answer(text, expected):
    assert last_answer(text) == expected


def test_retrieved_blocks_only_directly_after_a_search():
    text = (
        "<context>policy-written before any search: Thimphu</context>"
        "<search>capital of Bhutan</search>\n\n<context>[1] Thimphu is the capital.</context>\n"
        "<think>and again</think><context>policy-written after a think: Thimphu</context>"
        "<search>q2</search> not whitespace <context>text between: not the environment's</context>"
        "<search>q3</search> <context>second retrieval</context>"
        "<search> </search><context>Invalid action: the query was empty</context>"
        "<answer>Thimphu</answer>"
    )
    assert retrieved_blocks(text) == ["[1] Thimphu is the capital.", "second retrieval"]
    assert search_queries(text) == ["capital of Bhutan", "q2", "q3", ""]


@pytest.mark.parametrize("text", [
    "<answer>Thimphu</answer>",
    "<think>easy</think> <answer>Thimphu</answer>",
    "<think>a</think><search>q</search>\n\n<context>c</context>\n\n<answer>Thimphu</answer>",
    "<search>q</search><context>c</context><think>b</think><search>q2</search><context>d</context><think>e</think><answer>x</answer>",
    "\n <think>a</think>\n<answer>x</answer>\n ",
])
def test_structure_valid_legal(text):
    assert structure_valid(text)


@pytest.mark.parametrize("text", [
    "",
    "<think>a</think>",  # no answer
    "<think>a</think><search>q</search><context>c</context>",  # ends on an observation
    "<answer>x</answer><think>after</think>",  # a tag after the answer
    "<answer>x</answer> and some more text",  # text after the answer
    "<answer>x</answer><answer>y</answer>",  # two answers
    "Let me think. <answer>x</answer>",  # text outside the tags
    "<think>a</think> so <search>q</search><context>c</context><answer>x</answer>",
    "<think>a</think><think>b</think><answer>x</answer>",  # two thinks in a row
    "<search>q</search><answer>x</answer>",  # a search with no observation
    "<search>q</search><search>q2</search><context>c</context><answer>x</answer>",
    "<think>a</think><context>policy-written</context><answer>x</answer>",  # observation without a search
    # the rollout's corrective note: an observation after an invalid action
    "bad action\n<context>Invalid action: use <search> query </search> or <answer> answer </answer>.</context><answer>x</answer>",
    "<search>q</search><context>c</context><context>Invalid action.</context><answer>x</answer>",
    # an empty search is an invalid action; its corrective note is not a retrieval
    "<search> </search><context>Invalid action: empty query.</context><answer>x</answer>",
    "<think>a</think><answer>  </answer>",  # an empty answer is an invalid action too
    "<think>unclosed <answer>x</answer>",
    "<answer>x",
])
def test_structure_valid_illegal(text):
    assert not structure_valid(text)
