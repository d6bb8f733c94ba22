"""Local corpora, tokenizer loading, and packing text into fixed-length blocks for causal-LM training.

A recipe's ``tokenizer:`` and ``data:`` blocks are plain dicts; this module turns them into a tokenizer
and a ``DatasetDict`` with ``train``/``validation`` splits of one ``text`` column, and ``pack`` turns a
split into ``input_ids``/``labels`` blocks ready for ``Trainer`` with ``default_data_collator``.

The optimizer package never imports this module (it is pure PyTorch), so importing transformers and
datasets at the top here costs the optimizer users nothing.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import datasets
import pyarrow as pa
import transformers

from .errors import DataSpecError

EOS_TOKEN = "<|endoftext|>"

# Keys of the recipe blocks, listed in error messages so a bad recipe says what would have been valid.
TOKENIZER_KEYS = ("name_or_path", "train_bpe")
BPE_KEYS = ("vocab_size", "min_frequency")
SOURCE_KEYS = ("builtin", "dataset", "train_files")
COMMON_DATA_KEYS = ("validation_fraction", "seed", "max_train_rows", "max_validation_rows", "streaming",
                    "shuffle_buffer")
# For json rows and Hub datasets.
COLUMN_KEYS = ("format", "text_column", "prompt_column", "input_column", "response_column")
SOURCE_OPTIONS = {
    "builtin": (),
    "dataset": ("config", "train_split", "validation_split", *COLUMN_KEYS),
    "train_files": ("validation_files", "sample_by", *COLUMN_KEYS),
}
# chat: instruction data as prompt/completion conversations for TRL's SFTTrainer (the model's chat template
# renders them; the loss covers the completion only).
FORMATS = ("text", "prompt_response", "chat")
CHAT_DEFAULT_COLUMNS = {"prompt_column": "instruction", "input_column": "input", "response_column": "output"}
TEXT_EXTENSIONS = (".txt", ".text")
JSON_EXTENSIONS = (".json", ".jsonl")
BUILTIN_CHUNK_CHARS = 2000
# pydoc: CPython's English help topics (~120k tokens); stdlib: the standard library's Python source
# (~30 MB, one document per file), large enough that a CPU run sees each token at most once.
BUILTIN_CORPORA = ("pydoc", "stdlib")


# ----------------------------------------------------------------------------------------------- corpora
def pydoc_text() -> str:
    """CPython's pydoc help topics (~460k characters of English): a corpus present on every machine."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def _pydoc_rows(max_chars: int = BUILTIN_CHUNK_CHARS) -> list[str]:
    """Each help topic cut at paragraph breaks into chunks of about ``max_chars``.

    Whole topics (79, from 200 to 62k characters) would make a 5% validation split very lumpy, single
    paragraphs (median ~110 characters) would put an end-of-text token every ~30 tokens; paragraph-aligned
    chunks of a few hundred tokens sit between the two.
    """
    from pydoc_data.topics import topics

    rows = []
    for key in sorted(topics):
        chunk = ""
        for paragraph in topics[key].split("\n\n"):
            if not paragraph.strip():
                continue
            if chunk and len(chunk) + len(paragraph) > max_chars:
                rows.append(chunk)
                chunk = ""
            chunk = f"{chunk}\n\n{paragraph}" if chunk else paragraph
        if chunk:
            rows.append(chunk)
    return rows


def stdlib_files() -> list[str]:
    """The Python source files of this interpreter's standard library (~1,800 files, ~30 MB of code,
    sorted by path; site-packages excluded): a code corpus present on every machine."""
    import pathlib
    import sysconfig

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts)


def read_documents(files: list[str]) -> list[str]:
    """Each file's text as one document (undecodable bytes replaced, empty files dropped)."""
    docs = []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        if text.strip():
            docs.append(text)
    return docs


# ------------------------------------------------------------------------------------------- tokenizers
def train_bpe_tokenizer(
    texts: list[str], vocab_size: int = 4096, min_frequency: int = 2
) -> transformers.PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE tokenizer on ``texts``; ``<|endoftext|>`` is its only special token.

    Byte-level means every string is encodable (no unknown tokens) and decoding is lossless. Training is
    deterministic for the same input, so a recipe that trains its tokenizer reproduces it exactly.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < 257:  # 256 byte symbols + the special token
        raise DataSpecError(f"train_bpe vocab_size={vocab_size} is too small; byte-level BPE needs >= 257.")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even ones absent from texts
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    # The wrapper is what Trainer, save_pretrained and AutoTokenizer.from_pretrained understand.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


def load_tokenizer(spec: dict, texts_for_training: Callable[[], list[str]] | None = None):
    """Build the tokenizer a recipe's ``tokenizer:`` block asks for.

    ``{"name_or_path": "gpt2"}`` loads a Hub tokenizer or a saved directory; ``{"train_bpe": {"vocab_size":
    4096}}`` trains one on ``texts_for_training()`` (a callable, so the corpus is only read when needed).
    A tokenizer without a pad token gets pad = eos, which batching needs and causal-LM labels never see
    (packed blocks are all real tokens).
    """
    if not isinstance(spec, dict):
        raise DataSpecError(
            f"tokenizer must be a mapping with one of the keys {TOKENIZER_KEYS}, got {spec!r}."
        )
    unknown = sorted(set(spec) - set(TOKENIZER_KEYS))
    if unknown:
        raise DataSpecError(f"tokenizer has unknown key(s) {unknown}; valid keys are {TOKENIZER_KEYS}.")
    if len(spec) != 1:
        raise DataSpecError(f"tokenizer needs exactly one of {TOKENIZER_KEYS}, got {sorted(spec) or 'none'}.")

    if "name_or_path" in spec:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec["name_or_path"])
    else:
        options = spec["train_bpe"] if spec["train_bpe"] is not None else {}
        if not isinstance(options, dict) or set(options) - set(BPE_KEYS):
            raise DataSpecError(
                f"tokenizer.train_bpe must be a mapping with keys among {BPE_KEYS}, got {options!r}."
            )
        if texts_for_training is None:
            raise DataSpecError(
                "tokenizer.train_bpe needs texts to train on, but no texts_for_training was given."
            )
        tokenizer = train_bpe_tokenizer(texts_for_training(), **options)

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataSpecError(
                f"tokenizer {spec} has neither a pad nor an eos token; packing needs an eos token."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------- datasets
def check_data_spec(spec: dict) -> str:
    """Validate the ``data:`` block and return its source key; every message lists the valid keys."""
    if not isinstance(spec, dict):
        raise DataSpecError(f"data must be a mapping with one of the keys {SOURCE_KEYS}, got {spec!r}.")
    sources = [key for key in SOURCE_KEYS if key in spec]
    if len(sources) != 1:
        raise DataSpecError(f"data needs exactly one source among {SOURCE_KEYS}, got {sources or 'none'}.")
    source = sources[0]
    valid = (source, *SOURCE_OPTIONS[source], *COMMON_DATA_KEYS)
    unknown = sorted(set(spec) - set(valid))
    if unknown:
        raise DataSpecError(
            f"data with source {source!r} has unknown key(s) {unknown}; valid keys are {valid}."
        )
    if source == "builtin" and spec["builtin"] not in BUILTIN_CORPORA:
        raise DataSpecError(
            f"data.builtin={spec['builtin']!r} is unknown; builtin corpora are {BUILTIN_CORPORA}."
        )
    if spec.get("format", "text") not in FORMATS:
        raise DataSpecError(f"data.format={spec['format']!r} is unknown; valid formats are {FORMATS}.")
    fraction = spec.get("validation_fraction")
    if fraction is not None:
        if not 0 < fraction < 1:
            raise DataSpecError(f"data.validation_fraction={fraction} must lie strictly between 0 and 1.")
        if "validation_split" in spec or "validation_files" in spec:
            raise DataSpecError(
                "data.validation_fraction cannot be combined with validation_split/validation_files."
            )
    for key in ("max_train_rows", "max_validation_rows", "shuffle_buffer"):
        if key in spec and (not isinstance(spec[key], int) or spec[key] < 1):
            raise DataSpecError(f"data.{key}={spec[key]!r} must be a positive integer.")
    if spec.get("format") == "chat" and source == "builtin":
        raise DataSpecError("data.format=chat needs instruction rows (a dataset or json files), not a "
                            "builtin corpus.")
    if spec.get("streaming"):
        if source == "builtin":
            raise DataSpecError("data.streaming applies to a dataset or data files, not to a builtin corpus.")
        if "max_validation_rows" not in spec or fraction is not None:
            raise DataSpecError(
                "data.streaming needs max_validation_rows (the validation rows: the first rows of "
                "validation_split/validation_files, or else held out from the start of the training stream) "
                "and no validation_fraction (a stream has no length to take a fraction of).")
    elif "shuffle_buffer" in spec:
        raise DataSpecError("data.shuffle_buffer applies with streaming: true only.")
    return source


def _load_files(files, spec: dict, cache_dir: str | None) -> datasets.Dataset:
    """Load local .txt (one row per paragraph, by default) or .json/.jsonl files as one dataset."""
    files = [files] if isinstance(files, str) else list(files)
    if not files:
        raise DataSpecError("data.train_files/validation_files is empty; give at least one file.")
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    if kinds <= set(TEXT_EXTENSIONS):
        if set(spec) & set(COLUMN_KEYS):
            raise DataSpecError(
                f"data keys {COLUMN_KEYS} apply to json files only, not to text files {files}."
            )
        # Paragraphs, not the builder's default lines: pack() ends every row with eos, and a document
        # should not be interrupted after every line.
        sample_by = spec.get("sample_by", "paragraph")
        return datasets.load_dataset(
            "text", data_files=files, sample_by=sample_by, split="train", cache_dir=cache_dir
        )
    if kinds <= set(JSON_EXTENSIONS):
        if "sample_by" in spec:
            raise DataSpecError("data.sample_by applies to .txt files only.")
        return datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
    raise DataSpecError(
        f"data files must all be text {TEXT_EXTENSIONS} or all json {JSON_EXTENSIONS}; "
        f"got extensions {sorted(kinds)}."
    )


def _to_text_column(dataset: datasets.Dataset, spec: dict) -> datasets.Dataset:
    """Reduce a dataset to its single ``text`` column, joining prompt and response for instruction data."""
    if spec.get("format", "text") == "prompt_response":
        prompt, response = spec.get("prompt_column", "prompt"), spec.get("response_column", "response")
        needed = [prompt, response]
    else:
        needed = [spec.get("text_column", "text")]
    missing = [c for c in needed if c not in dataset.column_names]
    if missing:
        raise DataSpecError(
            f"data column(s) {missing} not found; the dataset has columns {dataset.column_names}."
        )
    dataset = dataset.select_columns(needed)
    if len(needed) == 2:
        dataset = dataset.map(
            lambda batch: {"text": [f"{p}\n\n{r}" for p, r in zip(batch[prompt], batch[response])]},
            batched=True,
            remove_columns=needed,
        )
    elif needed[0] != "text":
        dataset = dataset.rename_column(needed[0], "text")
    # Empty rows (blank lines in wikitext-style corpora) would only add lone eos tokens to the packed stream.
    return dataset.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)


def load_text_datasets(spec: dict, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Load the corpus a recipe's ``data:`` block names: ``train``/``validation`` splits, one ``text`` column.

    Sources (exactly one): ``builtin: pydoc`` or ``builtin: stdlib``; ``dataset: <Hub name or local dataset
    dir>`` with optional ``config``, ``train_split`` (default ``train``) and ``validation_split``;
    ``train_files`` with optional ``validation_files`` (local .txt/.json/.jsonl). Without a validation
    split or files, a deterministic ``validation_fraction`` (default 0.05, shuffled with ``seed``, default
    0) of train is held out.
    ``max_train_rows``/``max_validation_rows`` keep (at most) the first rows, for short runs.
    """
    source = check_data_spec(spec)
    if spec.get("streaming"):
        return load_streaming_datasets(spec, cache_dir)
    train, validation = _load_source(source, spec, cache_dir)
    if validation is None:
        train, validation = _hold_out(train, spec)
    # Limit rows before the per-row passes of _to_text_column, so a shrunken run over a large dataset
    # converts only the rows it keeps (select only records indices, it reads nothing).
    train = _first_rows(train, spec.get("max_train_rows"))
    validation = _first_rows(validation, spec.get("max_validation_rows"))
    if source != "builtin":
        convert = to_conversations if spec.get("format") == "chat" else _to_text_column
        train, validation = convert(train, spec), convert(validation, spec)
    return datasets.DatasetDict(train=train, validation=validation)


# ------------------------------------------------------------------------------------------- chat rows
def _chat_row(spec: dict, columns) -> Callable[[dict], dict]:
    names = {k: spec.get(k, v) for k, v in CHAT_DEFAULT_COLUMNS.items()}
    prompt, extra, response = names["prompt_column"], names["input_column"], names["response_column"]
    missing = [c for c in (prompt, response) if c not in columns]
    if missing:
        raise DataSpecError(f"data column(s) {missing} not found for format chat; the dataset has columns "
                            f"{list(columns)} (set prompt_column / input_column / response_column).")
    use_extra = extra in columns

    def row(r: dict) -> dict:
        # Alpaca's optional `input` (the material the instruction is about) follows the instruction in the
        # same user turn; rows without one are the instruction alone.
        text = r[prompt] + (f"\n\n{r[extra]}" if use_extra and r[extra] and r[extra].strip() else "")
        return {"prompt": [{"role": "user", "content": text}],
                "completion": [{"role": "assistant", "content": r[response]}]}

    return row


def to_conversations(dataset, spec: dict):
    """Instruction rows (instruction, optional input, output) as TRL's conversational prompt/completion."""
    row = _chat_row(spec, dataset.column_names)
    return dataset.map(row, remove_columns=dataset.column_names)


# ------------------------------------------------------------------------------------------- streaming
def load_streaming_datasets(spec: dict, cache_dir: str | None = None) -> datasets.DatasetDict:
    """Like :func:`load_text_datasets`, with ``train`` an ``IterableDataset`` read lazily from the source
    (Hub or local files; nothing is downloaded or converted up front, memory does not grow with the corpus)
    and ``validation`` the first ``max_validation_rows`` rows (of the validation split or files, else of the
    training stream, which then skips them), in memory. ``shuffle_buffer`` shuffles train in a buffer of that
    many rows; ``max_train_rows`` stops the stream."""
    source = check_data_spec(spec)
    if source == "dataset":
        def load(split):
            return datasets.load_dataset(spec["dataset"], spec.get("config"), split=split, streaming=True,
                                         cache_dir=cache_dir)
        train = load(spec.get("train_split", "train"))
        validation = load(spec["validation_split"]) if "validation_split" in spec else None
    else:
        train = _stream_files(spec["train_files"], spec, cache_dir)
        validation = (_stream_files(spec["validation_files"], spec, cache_dir)
                      if "validation_files" in spec else None)
    n_validation = spec["max_validation_rows"]
    if validation is None:
        validation, train = train.take(n_validation), train.skip(n_validation)
    else:
        validation = validation.take(n_validation)
    if "shuffle_buffer" in spec:
        train = train.shuffle(seed=spec.get("seed", 0), buffer_size=spec["shuffle_buffer"])
    if "max_train_rows" in spec:
        train = train.take(spec["max_train_rows"])
    validation = datasets.Dataset.from_list(list(validation))
    if spec.get("format") == "chat":
        row = _chat_row(spec, validation.column_names)
        return datasets.DatasetDict(train=train.map(row, remove_columns=validation.column_names),
                                    validation=to_conversations(validation, spec))
    return datasets.DatasetDict(train=_stream_text_column(train, spec),
                                validation=_to_text_column(validation, spec))


def _stream_files(files, spec: dict, cache_dir: str | None):
    files = [files] if isinstance(files, str) else list(files)
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    if kinds <= set(TEXT_EXTENSIONS):
        return datasets.load_dataset("text", data_files=files, sample_by=spec.get("sample_by", "paragraph"),
                                     split="train", streaming=True, cache_dir=cache_dir)
    if kinds <= set(JSON_EXTENSIONS):
        return datasets.load_dataset("json", data_files=files, split="train", streaming=True,
                                     cache_dir=cache_dir)
    raise DataSpecError(f"data files must all be text {TEXT_EXTENSIONS} or all json {JSON_EXTENSIONS}; "
                        f"got extensions {sorted(kinds)}.")


def _stream_text_column(stream, spec: dict):
    """The stream's rows reduced to a non-empty ``text`` (the streaming twin of ``_to_text_column``)."""
    if spec.get("format", "text") == "prompt_response":
        prompt, response = spec.get("prompt_column", "prompt"), spec.get("response_column", "response")
        stream = stream.map(lambda r: {"text": f"{r[prompt]}\n\n{r[response]}"})
    else:
        column = spec.get("text_column", "text")
        if column != "text":
            stream = stream.map(lambda r: {"text": r[column]})
    stream = stream.select_columns(["text"])
    return stream.filter(lambda r: bool(r["text"] and r["text"].strip()))


# Values the tokenizers library reads as "off" (any other set value is "on").
_TOKENIZERS_OFF = ("", "off", "false", "f", "no", "n", "0")


def fork_safe_tokenizers(num_workers: int) -> None:
    """Before DataLoader workers are forked: turn the fast tokenizers' own thread pool off.

    A streamed corpus is tokenized in the workers. If the tokenizer's Rust thread pool already ran in the
    parent (the validation split, the tokenizer's training) and ``TOKENIZERS_PARALLELISM`` is on, a forked
    worker that tokenizes waits forever on that pool's threads, which the fork did not copy: the run hangs
    before its first step, silently. The library only protects itself when the variable is unset, so with
    workers the variable is set to false (each worker tokenizes on its own core), saying so when the
    user had turned it on."""
    if num_workers <= 0:
        return
    value = os.environ.get("TOKENIZERS_PARALLELISM")
    if value is not None and value.strip().lower() not in _TOKENIZERS_OFF:
        warnings.warn(f"TOKENIZERS_PARALLELISM={value!r} with dataloader_num_workers={num_workers}: a "
                      "tokenizer used before the loader workers fork would deadlock in them, so it is set to "
                      "'false' for this run (the workers tokenize in parallel instead). Set "
                      "dataloader_num_workers=0 to keep the tokenizer's threads.", stacklevel=2)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _packing_eos(tokenizer, block_size: int) -> int:
    """The eos id that separates packed documents, after checking ``block_size``."""
    if block_size < 1:
        raise DataSpecError(f"block_size={block_size} must be a positive integer.")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataSpecError("the tokenizer has no eos token; packing needs one to separate documents.")
    return eos


def pack_stream(stream, tokenizer, block_size: int, batch_rows: int = 1000):
    """Tokenize a streamed ``text`` column and cut it into ``block_size`` blocks, ``batch_rows`` documents
    at a time: memory holds one batch, whatever the corpus size. Within a batch the documents are concatenated
    (eos-separated) as :func:`pack` does for a whole split; the remainder of each batch (< block_size tokens
    of ~batch_rows documents) is dropped, as run_clm.py's group_texts does. The stream keeps its shards, so
    DataLoader workers and ranks split it as datasets splits any IterableDataset."""
    eos = _packing_eos(tokenizer, block_size)

    def blocks(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        flat = [t for doc in ids for t in (*doc, eos)]
        n = len(flat) // block_size * block_size
        out = [flat[i : i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": out, "labels": out}

    return stream.map(blocks, batched=True, batch_size=batch_rows, remove_columns=["text"])


def _load_source(source: str, spec: dict, cache_dir: str | None):
    """(train, validation or None) as the source gives them, before any column handling."""
    if source == "builtin":
        rows = _pydoc_rows() if spec["builtin"] == "pydoc" else read_documents(stdlib_files())
        return datasets.Dataset.from_dict({"text": rows}), None
    if source == "dataset":
        name, config = spec["dataset"], spec.get("config")
        train = datasets.load_dataset(name, config, split=spec.get("train_split", "train"),
                                      cache_dir=cache_dir)
        if "validation_split" not in spec:
            return train, None
        return train, datasets.load_dataset(name, config, split=spec["validation_split"], cache_dir=cache_dir)
    train = _load_files(spec["train_files"], spec, cache_dir)
    if "validation_files" not in spec:
        return train, None
    return train, _load_files(spec["validation_files"], spec, cache_dir)


def _hold_out(train: datasets.Dataset, spec: dict) -> tuple[datasets.Dataset, datasets.Dataset]:
    """A deterministic ``validation_fraction`` (default 0.05, shuffled with ``seed``) of train, held out."""
    if len(train) < 2:
        raise DataSpecError(f"data has {len(train)} training row(s); cannot hold out a validation split.")
    split = train.train_test_split(test_size=spec.get("validation_fraction", 0.05), seed=spec.get("seed", 0),
                                   shuffle=True)
    return split["train"], split["test"]


def _first_rows(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


# ------------------------------------------------------------------------------------------------ packing
def pack(
    dataset: datasets.Dataset, tokenizer, block_size: int, num_proc: int | None = None
) -> datasets.Dataset:
    """Tokenize ``text``, end each document with eos, concatenate all of it and cut blocks of ``block_size``.

    Unlike ``run_clm.py``, which groups within each map batch of 1000 rows, the whole stream is concatenated
    once, so only the final remainder (< block_size tokens) is dropped. ``labels`` is ``input_ids`` (the model
    shifts them); both columns share one Arrow buffer, so the copy costs no memory. The packed dataset lives
    in memory (8 bytes a token), which suits the corpora of the recipes; stream larger ones instead.
    """
    eos = _packing_eos(tokenizer, block_size)

    def tokenize(batch):
        # add_special_tokens=False: documents are separated by eos alone, not by per-model bos/cls tokens.
        # verbose=False: documents longer than model_max_length are expected here, they get cut into blocks.
        ids = tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [doc + [eos] for doc in ids]}

    tokenized = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing"
    )
    # map() writes a fresh table (no indices mapping), so its Arrow chunks are exactly the rows in order.
    # Flattening a chunk is zero-copy; the cast to int64 (datasets stores input_ids as int32, but
    # cross_entropy refuses int32 targets) and the concatenation make the one in-memory copy.
    chunks = tokenized.data.column("input_ids").chunks
    stream = pa.concat_arrays([chunk.flatten().cast(pa.int64()) for chunk in chunks])
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise DataSpecError(
            f"the corpus has {len(stream)} tokens, fewer than block_size={block_size}, so packing gives no "
            "block; lower block_size or use more data (raise max_*_rows)."
        )
    # Fixed-size lists: no per-row offsets (which are int32 in plain lists and overflow past 2**31 tokens).
    blocks = pa.FixedSizeListArray.from_arrays(stream.slice(0, n_blocks * block_size), block_size)
    return datasets.Dataset(pa.table({"input_ids": blocks, "labels": blocks}))
