"""Train a tokenizer of the student's own on the store's corpus (cross-tokenizer distillation).

A byte-level BPE (the `tokenizers` library), so every text round-trips and character offsets are
exact, trained on the training side of the store's own corpus split (validation documents stay
unseen, as they do for the teacher pass), saved as a Hugging Face tokenizer folder with an EOS
token. Deterministic for a corpus and a vocabulary size.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kdstore.reader import StoreReader
from pipeline.capture.corpus import list_corpus_files, read_documents
from pipeline.capture.packing import is_validation
from pipeline.capture.shard_plan import corpus_source
from pipeline.config import ConfigError

EOS = "<|endoftext|>"


def training_documents(reader: StoreReader) -> Iterator[str]:
    """The documents of a store's corpus that are not held out (its train split)."""
    from pipeline.config import CacheConfig, CorpusConfig

    packing = reader.meta.provenance.packing
    corpus = CorpusConfig(**reader.meta.provenance.corpus, max_documents=packing.get("max_documents"))
    source = corpus_source(CacheConfig(store=reader.location.url, corpus=corpus))
    held_out = float(packing.get("val_fraction") or 0.0) if packing.get("split") == "train" else 0.0
    for file in list_corpus_files(source):
        docs = read_documents(file, source)
        if corpus.max_documents is not None:
            docs = itertools.islice(docs, corpus.max_documents)
        for text in docs:
            if isinstance(text, str) and text.strip() and not (held_out and is_validation(text, held_out)):
                yield text


def train_tokenizer(documents: Iterator[str], vocab_size: int, out: str | Path) -> Any:
    """Byte-level BPE of `vocab_size` ids (EOS included) → a PreTrainedTokenizerFast saved at `out`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(f"vocab_size {vocab_size} is below the {len(alphabet) + 1} ids a byte-level BPE needs")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise ConfigError(f"{out} exists and is not empty: a trained tokenizer is never overwritten; choose another "
                          "folder or remove it")
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    model.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], initial_alphabet=alphabet,
                                  show_progress=False)
    model.train_from_iterator(documents, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                        clean_up_tokenization_spaces=False)
    Path(out).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out))
    return tokenizer


def train_store_tokenizer(store: str, vocab_size: int, out: str | Path) -> Any:
    """A tokenizer of `vocab_size` trained on the training documents of `store`'s corpus."""
    return train_tokenizer(training_documents(StoreReader(store)), vocab_size, out)
