"""SQuAD v1.1 EM/F1 as the official evaluate-v1.1.py computes them, the QA families' default.

The reference below is the official script's scoring code written out verbatim (rajpurkar.github.io/SQuAD-explorer,
evaluate-v1.1.py: normalize_answer, f1_score, exact_match_score, metric_max_over_ground_truths, evaluate), not
imported from the package. The fixture ``squad_official_tricky.json`` has multiple gold answers, articles, ASCII
and Unicode punctuation (en dash, curly quotes and apostrophe), a ligature, upper-case non-ASCII letters and a
prediction that normalises to nothing; the fixed predictions below exercise each.
"""

from __future__ import annotations

import json
import re
import string
import sys
from collections import Counter

import pytest
from conftest import FIXTURES, invoke_cli

from r3mem_bench.families import get_family
from r3mem_bench.method import Answer, MemoryMethod
from r3mem_bench.metrics import best_over, exact_match_official, f1_official, normalize_official
from r3mem_bench.task import TaskRegistry

FIXTURE = FIXTURES / "rag" / "squad_official_tricky.json"
PREDICTIONS = {  # question -> fixed prediction
    "Which team won Super Bowl 50?": "the Denver Broncos!",
    "What was the final score?": "24-10",  # ASCII hyphen vs the gold's en dash
    "Where was the game held?": "Levi's Stadium in Santa Clara",  # ASCII vs curly apostrophe, partial overlap
    "In which country is Santa Clara?": "the US",
    "Who lost the game?": "“Carolina Panthers”",  # curly quotes are not in string.punctuation
    "How much did the broadcast rights cost?": "5 million",
    "Who wrote the report?": "émile zola",
    "Which report was it?": "final",  # the gold has the 'fi' ligature
    "Where was it written?": "New York New York",
    "Which café?": "the",  # normalises to nothing
}


# ---- the official SQuAD v1.1 evaluation script's functions, verbatim ------------------------------------------
def normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


def f1_score(prediction, ground_truth):
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    f1 = (2 * precision * recall) / (precision + recall)
    return f1


def exact_match_score(prediction, ground_truth):
    return (normalize_answer(prediction) == normalize_answer(ground_truth))


def metric_max_over_ground_truths(metric_fn, prediction, ground_truths):
    scores_for_ground_truths = []
    for ground_truth in ground_truths:
        score = metric_fn(prediction, ground_truth)
        scores_for_ground_truths.append(score)
    return max(scores_for_ground_truths)


def evaluate(dataset, predictions):
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article['paragraphs']:
            for qa in paragraph['qas']:
                total += 1
                if qa['id'] not in predictions:
                    message = 'Unanswered question ' + qa['id'] + \
                              ' will receive score 0.'
                    print(message, file=sys.stderr)
                    continue
                ground_truths = list(map(lambda x: x['text'], qa['answers']))
                prediction = predictions[qa['id']]
                exact_match += metric_max_over_ground_truths(
                    exact_match_score, prediction, ground_truths)
                f1 += metric_max_over_ground_truths(
                    f1_score, prediction, ground_truths)

    exact_match = 100.0 * exact_match / total
    f1 = 100.0 * f1 / total

    return {'exact_match': exact_match, 'f1': f1}


# ---- tests ------------------------------------------------------------------------------------------------------
def _qas():
    data = json.loads(FIXTURE.read_text(encoding="utf-8"))["data"]
    return [qa for art in data for para in art["paragraphs"] for qa in para["qas"]]


def test_metric_functions_equal_the_official_script_on_fixed_pairs():
    for qa in _qas():
        pred, golds = PREDICTIONS[qa["question"]], [a["text"] for a in qa["answers"]]
        for g in golds:
            assert normalize_official(g) == normalize_answer(g)
            assert exact_match_official(pred, g) == float(exact_match_score(pred, g))
            assert f1_official(pred, g) == pytest.approx(f1_score(pred, g), abs=1e-12)
        assert best_over(exact_match_official, pred, golds) == metric_max_over_ground_truths(exact_match_score, pred, golds)
        assert best_over(f1_official, pred, golds) == pytest.approx(
            metric_max_over_ground_truths(f1_score, pred, golds), abs=1e-12)
    # hand values on the tricky cases, so the reference itself is pinned
    assert f1_score("24-10", "24–10") == 0 and f1_score("final", "ﬁnal") == 0
    assert exact_match_score("the", "Café Müller") is False and f1_score("the", "the") == 0
    assert f1_score("New York New York", "New York") == pytest.approx(2 / 3)
    assert exact_match_score("the US", "U.S.") and exact_match_score("émile zola", "ÉMILE Zola")


def test_family_scores_official_by_default_extended_on_request(tiny_lm):
    (task,) = TaskRegistry().resolve("squad")
    fam = get_family("rag")
    examples = fam.examples(task, str(FIXTURE), tiny_lm.tokenizer)
    assert task.params["normalization"] == "official"
    for ex in examples:
        pred = PREDICTIONS[ex["question"]]
        got = fam.score(ex, Answer(pred))
        assert got["em"] == metric_max_over_ground_truths(exact_match_score, pred, ex["answers"])
        assert got["f1"] == pytest.approx(metric_max_over_ground_truths(f1_score, pred, ex["answers"]), abs=1e-12)
    by_q = {ex["question"]: ex for ex in examples}
    dash = by_q["What was the final score?"]
    assert fam.score(dash, Answer("24-10"))["em"] == 0.0
    assert fam.score(dash, Answer("24-10"), normalization="extended")["em"] == 1.0  # NFKC + Unicode punctuation


class _FixedPredictions(MemoryMethod):
    """Answers every question with the fixed prediction above (no retrieval, no likelihood path)."""

    name = "squad_fixed_predictions"
    families = ("rag",)

    def ingest(self, items):
        """Nothing to store."""

    def answer(self, question, now=None):
        return Answer(PREDICTIONS[question])


@pytest.fixture
def fixed_method():
    from r3mem_bench import methods
    from r3mem_bench.methods import registry

    methods.get_method_class("no_memory")  # discover the built-ins first
    registry.register_method(_FixedPredictions)
    yield _FixedPredictions.name
    registry._METHODS.pop(_FixedPredictions.name, None)
    registry._SOURCES.pop(_FixedPredictions.name, None)


def test_cli_run_reports_the_official_script_numbers(tmp_path, capsys, monkeypatch, fixed_method, tiny_lm):
    dataset = json.loads(FIXTURE.read_text(encoding="utf-8"))["data"]
    reported = {}
    for norm in ("official", "extended"):
        out = tmp_path / norm
        args = ["run", "--task", "squad", "--data", str(FIXTURE), "--method", fixed_method, "--model", "tiny-random",
                "--threads", "1", "--output", str(out), "-q"]
        code, text = invoke_cli(capsys, monkeypatch, *args, *([] if norm == "official" else ["--param", f"normalization={norm}"]))
        assert code == 0, text
        rows = [json.loads(line) for line in (out / "squad" / fixed_method / "results.jsonl").read_text().splitlines()]
        assert len(rows) == 10 and all(r["prediction"] == PREDICTIONS[r["question"]] for r in rows)
        code, text = invoke_cli(capsys, monkeypatch, "report", str(out), "--format", "json")
        assert code == 0, text
        (record,) = json.loads(text[text.index("["):])
        reported[norm] = record["metrics"]
        if norm == "official":
            ref = evaluate(dataset, {r["id"]: r["prediction"] for r in rows})
            assert round(100 * record["metrics"]["em"], 4) == round(ref["exact_match"], 4) == 40.0
            assert round(100 * record["metrics"]["f1"], 4) == round(ref["f1"], 4)
    # the extended normalisation forgives the dash, the curly quotes and the ligature: three more exact matches
    assert reported["extended"]["em"] == pytest.approx(reported["official"]["em"] + 0.3)
