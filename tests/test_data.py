"""hf_mousse.data: tokenizers (trained and loaded), the three corpus sources, packing, and spec errors."""

from __future__ import annotations

import copy
import json
import math

import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from hf_mousse import data
from hf_mousse.data import (
    DataSpecError,
    load_text_datasets,
    load_tokenizer,
    pack,
    pydoc_text,
    train_bpe_tokenizer,
)

SENTENCE = "Assert statements are a convenient way to insert debugging assertions into a program:"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(pydoc_text().split("\n\n"), vocab_size=4096)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def paragraphs(path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [p for p in f.read().split("\n\n") if p.strip()]


# ---------------------------------------------------------------------------------------------- tokenizers
def test_pydoc_text_is_the_sorted_topics():
    from pydoc_data.topics import topics

    text = pydoc_text()
    assert len(text) > 300_000
    assert text.startswith(topics[sorted(topics)[0]])
    assert SENTENCE.replace(" into", "\ninto") in text


def test_bpe_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    assert len(tokenizer) == 4096
    assert (
        tokenizer.eos_token
        == tokenizer.bos_token
        == tokenizer.pad_token
        == tokenizer.unk_token
        == "<|endoftext|>"
    )
    ids = tokenizer.encode(SENTENCE)
    assert len(ids) < len(SENTENCE.split()) * 2  # merges learned from pydoc: mostly whole words
    assert tokenizer.decode(ids) == SENTENCE

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.encode(SENTENCE) == ids
    assert loaded.eos_token_id == loaded.pad_token_id == tokenizer.eos_token_id
    unseen = "naïve café ✓ 東京\n\ttabs"  # byte-level: text absent from training still round-trips exactly
    assert loaded.decode(loaded.encode(unseen)) == unseen


def test_bpe_training_is_deterministic_and_honours_its_arguments():
    texts = pydoc_text()[:60_000].split("\n\n")
    first, second = train_bpe_tokenizer(texts, vocab_size=600), train_bpe_tokenizer(texts, vocab_size=600)
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()  # same merges, same order
    assert len(first) == 600
    # No pair occurs a million times: only the 256 byte symbols and the special token remain.
    assert len(train_bpe_tokenizer(texts, vocab_size=600, min_frequency=10**6)) == 257


def test_load_tokenizer_from_a_local_directory_sets_a_missing_pad(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token")
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None

    def never_called():
        raise AssertionError("a tokenizer loaded by name must not read the training corpus")

    loaded = load_tokenizer({"name_or_path": str(tmp_path)}, never_called)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"
    assert loaded.encode(SENTENCE) == tokenizer.encode(SENTENCE)


def test_load_tokenizer_trains_bpe_on_the_given_texts():
    calls = []

    def texts():
        calls.append(1)
        return pydoc_text()[:60_000].split("\n\n")

    trained = load_tokenizer({"train_bpe": {"vocab_size": 512, "min_frequency": 3}}, texts)
    assert calls == [1] and len(trained) == 512
    assert trained.get_vocab() == train_bpe_tokenizer(texts(), vocab_size=512, min_frequency=3).get_vocab()
    defaults = load_tokenizer({"train_bpe": None}, texts)
    assert defaults.get_vocab() == train_bpe_tokenizer(texts()).get_vocab()


@pytest.mark.parametrize(
    ("spec", "texts", "match"),
    [
        ({}, None, r"exactly one of \('name_or_path', 'train_bpe'\)"),
        ({"name_or_path": "x", "train_bpe": {}}, None, "exactly one of"),
        (
            {"path": "gpt2"},
            None,
            r"unknown key\(s\) \['path'\]; valid keys are \('name_or_path', 'train_bpe'\)",
        ),
        ({"train_bpe": {"vocab": 10}}, list, r"keys among \('vocab_size', 'min_frequency'\)"),
        ({"train_bpe": {}}, None, "no texts_for_training"),
        ({"train_bpe": {"vocab_size": 100}}, list, ">= 257"),
        ("gpt2", None, "must be a mapping"),
    ],
)
def test_bad_tokenizer_specs_raise(spec, texts, match):
    with pytest.raises(ValueError, match=match):
        load_tokenizer(spec, texts)


# ------------------------------------------------------------------------------------------------- packing
def test_pack_concatenates_documents_with_eos_and_cuts_exact_blocks(tokenizer):
    docs = [p for p in pydoc_text()[:20_000].split("\n\n") if p.strip()]
    stream = [i for doc in docs for i in tokenizer.encode(doc) + [tokenizer.eos_token_id]]
    block_size = 64
    packed = pack(data.datasets.Dataset.from_dict({"text": docs}), tokenizer, block_size)

    assert packed.column_names == ["input_ids", "labels"]
    assert len(packed) == len(stream) // block_size  # only the final remainder is dropped
    assert all(len(row) == block_size for row in packed["input_ids"])
    flat = [i for row in packed["input_ids"] for i in row]
    assert flat == stream[: len(flat)]
    assert flat.count(tokenizer.eos_token_id) == stream[: len(flat)].count(tokenizer.eos_token_id) > 10
    assert packed["labels"] == packed["input_ids"]
    assert packed.features["labels"].feature.dtype == "int64"  # cross_entropy refuses int32 targets

    packed_in_two_processes = pack(
        data.datasets.Dataset.from_dict({"text": docs}), tokenizer, block_size, num_proc=2
    )
    assert packed_in_two_processes["input_ids"] == packed["input_ids"]


def test_pack_separates_documents_by_eos_only_even_when_the_tokenizer_adds_a_bos(tokenizer):
    bos_adding = copy.deepcopy(tokenizer)  # like Llama's tokenizer: a special token before every text
    bos_adding.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.eos_token_id)]
    )
    docs = ["The assert statement.", "The break statement.", "The class definition."]
    assert bos_adding.encode(docs[0])[0] == tokenizer.eos_token_id
    packed = pack(data.datasets.Dataset.from_dict({"text": docs}), bos_adding, 1)
    expected = [i for doc in docs for i in tokenizer.encode(doc) + [tokenizer.eos_token_id]]
    assert [row[0] for row in packed["input_ids"]] == expected


def test_pack_refuses_a_corpus_shorter_than_one_block(tokenizer):
    dataset = data.datasets.Dataset.from_dict({"text": ["a short document", "and another"]})
    with pytest.raises(ValueError, match=r"the corpus has \d+ tokens, fewer than block_size=1024"):
        pack(dataset, tokenizer, 1024)
    with pytest.raises(ValueError, match="block_size=0"):
        pack(dataset, tokenizer, 0)


# ------------------------------------------------------------------------------------------------ datasets
def test_builtin_pydoc_rows_cover_the_text_with_a_deterministic_validation_split(tmp_path):
    spec = {"builtin": "pydoc"}
    splits = load_text_datasets(spec, cache_dir=str(tmp_path))
    rows = data._pydoc_rows()
    assert set(splits) == {"train", "validation"}
    assert splits["train"].column_names == splits["validation"].column_names == ["text"]
    assert len(splits["validation"]) == math.ceil(0.05 * len(rows))
    assert sorted(list(splits["train"]["text"]) + list(splits["validation"]["text"])) == sorted(rows)
    text = pydoc_text()
    assert all(row in text for row in rows)
    assert sum(len(p) for row in rows for p in row.split("\n\n")) == sum(len(p) for p in text.split("\n\n"))
    assert max(len(row) for row in rows if "\n\n" in row) <= data.BUILTIN_CHUNK_CHARS
    again = load_text_datasets(spec, cache_dir=str(tmp_path))
    assert again["validation"]["text"] == splits["validation"]["text"]
    reseeded = load_text_datasets({**spec, "seed": 1}, cache_dir=str(tmp_path))
    assert reseeded["validation"]["text"] != splits["validation"]["text"]


def test_local_text_files_give_one_row_per_paragraph(text_file, tmp_path):
    expected = paragraphs(text_file)
    splits = load_text_datasets(
        {"train_files": [text_file], "validation_fraction": 0.2}, cache_dir=str(tmp_path)
    )
    n_val = math.ceil(0.2 * len(expected))
    assert (len(splits["train"]), len(splits["validation"])) == (len(expected) - n_val, n_val)
    assert sorted(list(splits["train"]["text"]) + list(splits["validation"]["text"])) == sorted(expected)

    both = load_text_datasets(
        {"train_files": text_file, "validation_files": [text_file]}, cache_dir=str(tmp_path)
    )
    assert both["train"]["text"] == both["validation"]["text"] == expected

    lines = load_text_datasets({"train_files": text_file, "sample_by": "line"}, cache_dir=str(tmp_path))
    assert len(lines["train"]) + len(lines["validation"]) > len(expected)


def test_json_files_with_a_text_column_and_row_limits(tmp_path):
    rows = [{"id": i, "body": f"document number {i}"} for i in range(30)] + [{"id": 30, "body": "  "}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.json", [{"id": 99, "body": "held out"}, {"id": 98, "body": "another"}])
    spec = {"train_files": [train], "validation_files": [val], "text_column": "body"}
    splits = load_text_datasets(spec, cache_dir=str(tmp_path / "cache"))
    assert splits["train"].column_names == ["text"]
    assert splits["train"]["text"] == [f"document number {i}" for i in range(30)]  # the blank row is dropped
    assert splits["validation"]["text"] == ["held out", "another"]

    limited = load_text_datasets(
        {**spec, "max_train_rows": 7, "max_validation_rows": 1}, cache_dir=str(tmp_path / "cache")
    )
    assert limited["train"]["text"] == [f"document number {i}" for i in range(7)]
    assert limited["validation"]["text"] == ["held out"]


def test_prompt_response_json_is_joined_with_a_blank_line(tmp_path):
    rows = [{"question": f"What is {i}?", "answer": f"It is {i}.", "meta": i} for i in range(20)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    spec = {
        "train_files": [path],
        "format": "prompt_response",
        "prompt_column": "question",
        "response_column": "answer",
        "validation_fraction": 0.25,
    }
    splits = load_text_datasets(spec, cache_dir=str(tmp_path / "cache"))
    assert (len(splits["train"]), len(splits["validation"])) == (15, 5)
    assert splits["train"].column_names == ["text"]
    assert sorted(list(splits["train"]["text"]) + list(splits["validation"]["text"])) == sorted(
        f"What is {i}?\n\nIt is {i}." for i in range(20)
    )
    default_columns = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "response": "r"}] * 4)
    defaults = load_text_datasets(
        {"train_files": default_columns, "format": "prompt_response"}, cache_dir=str(tmp_path / "cache")
    )
    assert defaults["validation"]["text"] == ["p\n\nr"]


def test_dataset_route_loads_a_local_dataset_directory(tmp_path):
    # load_dataset on a directory is the same call that resolves a Hub name; split names come from file names.
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"content": f"train row {i}", "n": i} for i in range(12)])
    write_jsonl(folder / "validation.jsonl", [{"content": f"val row {i}", "n": i} for i in range(3)])
    spec = {"dataset": str(folder), "text_column": "content", "validation_split": "validation"}
    splits = load_text_datasets(spec, cache_dir=str(tmp_path / "cache"))
    assert splits["train"]["text"] == [f"train row {i}" for i in range(12)]
    assert splits["validation"]["text"] == [f"val row {i}" for i in range(3)]

    held_out = load_text_datasets(
        {"dataset": str(folder), "text_column": "content", "validation_fraction": 0.25},
        cache_dir=str(tmp_path / "cache"),
    )
    assert (len(held_out["train"]), len(held_out["validation"])) == (9, 3)
    assert all(t.startswith("train row") for t in held_out["validation"]["text"])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({}, r"exactly one source among \('builtin', 'dataset', 'train_files'\), got none"),
        ({"builtin": "pydoc", "dataset": "x"}, r"exactly one source .* got \['builtin', 'dataset'\]"),
        ({"builtin": "pydoc", "text_column": "t"}, r"unknown key\(s\) \['text_column'\]; valid keys are"),
        ({"dataset": "x", "validation_files": ["v.txt"]}, r"unknown key\(s\) \['validation_files'\]"),
        ({"builtin": "wiki"}, r"builtin corpora are \('pydoc', 'stdlib'\)"),
        ({"builtin": "pydoc", "validation_fraction": 1.5}, "strictly between 0 and 1"),
        (
            {"train_files": ["a.txt"], "validation_files": ["b.txt"], "validation_fraction": 0.1},
            "cannot be combined",
        ),
        ({"train_files": ["a.json"], "format": "dialogue"},
         r"valid formats are \(.text., .prompt_response., .chat.\)"),
        ({"builtin": "pydoc", "max_train_rows": 0}, "max_train_rows=0 must be a positive integer"),
        ({"train_files": ["a.txt", "b.csv"]}, r"all be text .* or all json .*\['.csv', '.txt'\]"),
        ({"train_files": []}, "is empty"),
        ("pydoc", "must be a mapping"),
    ],
)
def test_bad_data_specs_raise(spec, match, tmp_path):
    with pytest.raises(DataSpecError, match=match):
        load_text_datasets(spec, cache_dir=str(tmp_path))


def test_data_errors_caught_after_loading_name_the_problem(text_file, tmp_path):
    json_file = write_jsonl(tmp_path / "a.jsonl", [{"body": "x"}, {"body": "y"}])
    with pytest.raises(
        ValueError, match=r"column\(s\) \['text'\] not found; the dataset has columns \['body'\]"
    ):
        load_text_datasets({"train_files": json_file}, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="apply to json files only"):
        load_text_datasets({"train_files": text_file, "text_column": "body"}, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="sample_by applies to .txt files only"):
        load_text_datasets({"train_files": json_file, "sample_by": "line"}, cache_dir=str(tmp_path))
    one_row = write_jsonl(tmp_path / "one.jsonl", [{"text": "lonely"}])
    with pytest.raises(ValueError, match="cannot hold out a validation split"):
        load_text_datasets({"train_files": one_row}, cache_dir=str(tmp_path))
