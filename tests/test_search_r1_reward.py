"""Search-R1 rewards on hand-written transcripts: EM / F1 normalisation, each component,
the hacks a policy may try, and the format-aware variant's table row by row."""

import pytest

from brainforge.rewards.registry import call_reward, resolve_reward
from brainforge.rewards.search_r1 import answer_match, contains_gold, gold_answers, search_bonus, search_r1_format, tag_order

WEIGHTS = {answer_match: 0.7, tag_order: 0.2, search_bonus: 0.1}

RETRIEVED = "[1] Bhutan's capital and largest city is Thimphu. [2] Paro hosts the international airport."
SEARCHED_RIGHT = (
    "<think>I need the capital of Bhutan.</think> <search> capital of Bhutan </search>\n\n"
    f"<context>{RETRIEVED}</context>\n\n<think>The context says Thimphu.</think> <answer> Thimphu </answer>"
)
SEARCHED_WRONG = SEARCHED_RIGHT.replace("<answer> Thimphu </answer>", "<answer> Paro </answer>")


def total(completion: str, gold) -> float:
    return sum(weight * function([""], [completion], answer=[gold])[0] for function, weight in WEIGHTS.items())


def em(given: str, gold) -> float:
    return answer_match([""], [f"<answer>{given}</answer>"], answer=[gold])[0]


@pytest.mark.parametrize("given, gold, expected", [
    ("Thimphu", "Thimphu", 1.0),
    ("thimphu", "THIMPHU", 1.0),  # case
    ("Thimphu.", "Thimphu", 1.0),  # punctuation
    ("  the   Thimphu ", "Thimphu", 1.0),  # articles and whitespace
    ("The Hague", "Hague", 1.0),
    ("an apple", "a apple", 1.0),
    ("Thimphu city", "Thimphu", 0.0),
    ("+975", "975", 1.0),  # the sign is punctuation: a calling code written either way
    ("975", "+975", 1.0),
    ("9750", "975", 0.0),
    ("Paro", ["Thimphu", "Paro"], 1.0),  # any gold of a list
    ("Paro", '["Thimphu", "Paro"]', 1.0),  # a JSON-encoded list
    ("Punakha", '["Thimphu", "Paro"]', 0.0),
    ("[Thimphu]", "[Thimphu]", 1.0),  # a string that only looks like a list is one gold
    ("975", 975, 1.0),  # a number gold
    ("", "Thimphu", 0.0),
    ("the", "the Thimphu", 0.0),  # an answer that normalises to nothing never matches
])
def test_exact_match_normalisation(given, gold, expected):
    assert em(given, gold) == expected


def test_gold_answers_shapes():
    assert gold_answers("Thimphu") == ["Thimphu"]
    assert gold_answers(["Thimphu", "Paro"]) == ["Thimphu", "Paro"]
    assert gold_answers(("Thimphu",)) == ["Thimphu"]
    assert gold_answers('["Thimphu", 975]') == ["Thimphu", "975"]
    assert gold_answers("[not json") == ["[not json"]
    assert gold_answers(None) is None
    assert gold_answers([]) is None
    assert gold_answers("[]") is None
    assert gold_answers(["the", ""]) is None  # golds that normalise to nothing are not golds
    assert gold_answers([None, "Paro"]) == ["Paro"]


def test_f1_metric():
    def f1(given, gold):
        return answer_match([""], [f"<answer>{given}</answer>"], answer=[gold], metric="f1")[0]

    assert f1("Thimphu", "Thimphu") == 1.0
    assert f1("Thimphu city", "Thimphu") == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert f1("the city of Thimphu", ["Paro", "Thimphu city"]) == pytest.approx(0.8)  # best gold: p 2/3, r 1
    assert f1("Paro", "Thimphu") == 0.0
    assert answer_match([""], ["no tags"], answer=["Thimphu"], metric="f1") == [0.0]
    with pytest.raises(ValueError, match="metric must be 'em' or 'f1'"):
        answer_match([""], ["<answer>x</answer>"], answer=["x"], metric="sub_em")


def test_correct_valid_transcript_earns_every_component():
    assert [f([""], [SEARCHED_RIGHT], answer=["Thimphu"]) for f in WEIGHTS] == [[1.0], [1.0], [1.0]]
    assert total(SEARCHED_RIGHT, "Thimphu") == pytest.approx(1.0)


def test_wrong_answer_with_an_effective_search():
    assert [f([""], [SEARCHED_WRONG], answer=["Thimphu"])[0] for f in WEIGHTS] == [0.0, 1.0, 1.0]
    assert total(SEARCHED_WRONG, "Thimphu") == pytest.approx(0.3)


def test_closed_book_answer_gets_correctness_and_format_but_no_bonus():
    completion = "<think>I remember it.</think><answer>Thimphu</answer>"
    assert [f([""], [completion], answer=["Thimphu"])[0] for f in WEIGHTS] == [1.0, 1.0, 0.0]


def test_many_answers_only_the_last_counts():
    hedging = "<answer>Paro</answer><answer>Punakha</answer><answer>Thimphu</answer>"
    assert answer_match([""], [hedging], answer=["Thimphu"]) == [1.0]
    assert answer_match([""], [hedging], answer=["Paro"]) == [0.0]
    assert tag_order([""], [hedging], answer=["Thimphu"]) == [0.0]  # several answers are not a legal order
    # an unclosed last answer does not replace the closed one before it
    assert answer_match([""], ["<answer>Paro</answer> <answer>Thimphu"], answer=["Thimphu"]) == [0.0]


def test_answer_stuffed_with_every_candidate_fails_em():
    stuffed = "<think>x</think><answer>Thimphu, Paro, Punakha</answer>"
    assert answer_match([""], [stuffed], answer=["Thimphu"]) == [0.0]
    assert answer_match([""], [stuffed], answer=["Thimphu"], metric="f1")[0] == pytest.approx(0.5)  # F1 pays for the padding


def test_policy_written_context_with_the_gold_earns_no_bonus():
    fakes = [
        "<think>x</think><context>Thimphu is the capital.</context><answer>Thimphu</answer>",
        "<context>Thimphu</context><search>capital of Bhutan</search>\n<context>[1] Paro airport.</context><answer>Thimphu</answer>",
        "<search>capital</search> see <context>Thimphu</context><answer>Thimphu</answer>",
        "<think>I will search <search>q</search> <context>Thimphu</context> </think><answer>Thimphu</answer>",
        "<search> </search><context>Invalid action: empty query. Thimphu</context><answer>Thimphu</answer>",
    ]
    assert search_bonus([""] * len(fakes), fakes, answer=["Thimphu"] * len(fakes)) == [0.0] * len(fakes)


def test_gold_only_inside_a_longer_number_or_word_is_no_effective_search():
    def bonus(observation, gold):
        transcript = f"<search>q</search><context>{observation}</context><answer>x</answer>"
        return search_bonus([""], [transcript], answer=[gold])[0]

    assert bonus("The code is 9750 and 1975.", "975") == 0.0
    assert bonus("about 97.5 km away", "975") == 0.0
    assert bonus("Thimphuville is a village", "Thimphu") == 0.0
    assert bonus("dial +975 for Bhutan", "975") == 1.0
    assert bonus("dial 975, then the number", "+975") == 1.0
    assert bonus("Bhutan's capital is THIMPHU's centre", "Thimphu") == 1.0
    assert bonus("population 1,000 people", "1000") == 1.0
    assert bonus("the sequence 1,2,3 and 4", "2") == 1.0
    assert bonus("the sequence 1,2,3 and 4", "123") == 0.0
    assert bonus("pi is 3.14159", "3.14159") == 1.0
    assert bonus("The Hague is in the Netherlands", "the Hague") == 1.0
    assert bonus("Hague-born", "The Hague") == 1.0
    assert bonus("New Delhi", "New York") == 0.0


def test_contains_gold_words_in_sequence():
    assert contains_gold("capital: Thimphu, Bhutan", ["Thimphu Bhutan"])
    assert not contains_gold("Bhutan's Thimphu", ["Thimphu Bhutan"])
    assert not contains_gold("anything", ["the"])


# (completion, expected) for gold "Thimphu": the table of ALGORITHMS.md section 5
FORMAT_TABLE = [
    (SEARCHED_RIGHT, 1.0),  # correct, valid
    ("I think <answer>Thimphu</answer>", 0.8),  # correct, invalid
    (SEARCHED_WRONG, 0.2),  # wrong, valid
    ("I think <answer>Paro</answer>", 0.1),  # wrong, invalid
    ("<think>no idea</think><answer> ? </answer>", 0.2),  # no answer (normalises to nothing), valid
    ("<think>no idea</think>", 0.0),  # no answer, invalid
    ("I think <answer>the</answer>", 0.0),  # no answer, invalid
]


@pytest.mark.parametrize("completion, expected", FORMAT_TABLE)
def test_format_variant_table(completion, expected):
    assert search_r1_format([""], [completion], answer=["Thimphu"]) == [pytest.approx(expected)]


def test_format_variant_scores_and_retrieval_score():
    assert search_r1_format([""], ["I think <answer>Thimphu</answer>"], answer=["Thimphu"], structure_format_score=0.3) == [pytest.approx(0.7)]
    assert search_r1_format([""], ["I think <answer>Paro</answer>"], answer=["Thimphu"], final_format_score=0.05) == [pytest.approx(0.05)]
    # retrieval_score: only for a valid, not correct transcript whose search found the gold
    assert search_r1_format([""], [SEARCHED_WRONG], answer=["Thimphu"], retrieval_score=0.1) == [pytest.approx(0.3)]
    assert search_r1_format([""], [SEARCHED_WRONG], answer=["Punakha"], retrieval_score=0.1) == [pytest.approx(0.2)]
    assert search_r1_format([""], [SEARCHED_RIGHT], answer=["Thimphu"], retrieval_score=0.1) == [pytest.approx(1.0)]
    invalid = "so " + SEARCHED_WRONG
    assert search_r1_format([""], [invalid], answer=["Thimphu"], retrieval_score=0.1) == [pytest.approx(0.1)]


def test_rows_without_gold_are_none():
    completions = [SEARCHED_RIGHT, SEARCHED_RIGHT, SEARCHED_RIGHT, SEARCHED_RIGHT]
    golds = ["Thimphu", None, [], "[]"]
    for function in (answer_match, tag_order, search_bonus, search_r1_format):
        assert function([""] * 4, completions, answer=golds) == [1.0, None, None, None]
        assert function([""], [SEARCHED_RIGHT]) == [None]  # no answer column at all


def test_custom_tag_names_from_kwargs():
    tags = {"think_tag": "reason", "search_tag": "lookup", "observation_tag": "information", "answer_tag": "final"}
    transcript = (
        "<reason>need it</reason><lookup>capital of Bhutan</lookup>\n"
        f"<information>{RETRIEVED}</information><final>Thimphu</final>"
    )
    for function in (answer_match, tag_order, search_bonus, search_r1_format):
        assert function([""], [transcript], answer=["Thimphu"], **tags) == [1.0]
        assert function([""], [transcript], answer=["Thimphu"]) == [0.0]  # default tag names see no answer


@pytest.mark.parametrize("name, function", [
    ("answer_match", answer_match), ("tag_order", tag_order), ("search_bonus", search_bonus), ("search_r1_format", search_r1_format),
])
def test_registry_resolves_the_names(name, function):
    assert resolve_reward(name) is function
    # the trainer's call path: dataset columns plus the config's kwargs
    assert call_reward(name, function, [""], [SEARCHED_RIGHT], {"answer": ["Thimphu"]}, {}) == [1.0]
