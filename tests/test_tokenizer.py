"""Tokenizer: round trips, special ids from the config files, streaming detokenization."""

from __future__ import annotations

import json
import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer

MULTIBYTE = "héllo wörld 日本語 🎉 naïve café — ünïcödé ½ 𝔘"
CORPUS = [
    "def hello(world):\n    return world + 1\n",
    "import os\nclass Foo:\n    pass\n",
    "héllo wörld, café naïve, über straße",
    "日本語のテキスト 🎉🎉 emoji",
] * 5


def _byte_level() -> HFTokenizer:
    """A GPT-2-style byte-level BPE: multi-byte characters are split over several tokens."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return tok


def _sentencepiece_style() -> HFTokenizer:
    """A Llama-2-style BPE: "▁" for spaces, byte fallback, and a decoder that drops the leading
    space of the first token, so one token decoded alone differs from it in context."""
    chars = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:()_é") + ["▁"]
    merge_pairs = [("▁", "h"), ("e", "l"), ("el", "l"), ("ell", "o"), ("▁h", "ello"),
                   ("▁", "w"), ("o", "r"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld"),
                   ("▁", "d"), ("e", "f"), ("▁d", "ef")]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for token in chars + ["".join(p) for p in merge_pairs]:
        vocab.setdefault(token, len(vocab))
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merge_pairs, unk_token="<unk>",
                                 byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def _write(folder, tok: HFTokenizer, **files) -> str:
    tok.save(str(folder / "tokenizer.json"))
    for name, obj in files.items():
        (folder / f"{name}.json").write_text(json.dumps(obj))
    return str(folder)


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request, tmp_path_factory) -> Tokenizer:
    folder = tmp_path_factory.mktemp(request.param)
    hf = _byte_level() if request.param == "byte_level" else _sentencepiece_style()
    return Tokenizer.from_pretrained(_write(
        folder, hf, tokenizer_config={"bos_token": "<s>", "eos_token": "</s>",
                                      "add_bos_token": True}))


def test_round_trip(tokenizer):
    for text in ["def hello(world):\n    return 1", MULTIBYTE, "", " leading and  double"]:
        ids = tokenizer.encode(text)
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.encode(text, add_bos=False) == ids[1:]
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode("x"), skip_special_tokens=False).startswith("<s>")


def test_decode_rejects_out_of_vocab_ids(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([tokenizer.vocab_size])


def test_special_ids_from_tokenizer_and_generation_config(tmp_path):
    tok = Tokenizer.from_pretrained(_write(
        tmp_path, _byte_level(),
        tokenizer_config={"bos_token": {"content": "<s>", "lstrip": False},
                          "eos_token": {"content": "</s>"}, "add_bos_token": True},
        generation_config={"bos_token_id": 0, "eos_token_id": [7, 1]},
        config={"bos_token_id": 5, "eos_token_id": 6}))
    assert tok.bos_token_id == 0
    assert tok.eos_token_ids == (7, 1)  # generation_config's list, tokenizer's EOS already in it
    assert tok.eos_token_id == 7
    assert tok.vocab_size == 320
    assert tok.encode("def")[0] == 0


def test_eos_union_and_config_json_fallback(tmp_path):
    (tmp_path / "a").mkdir()
    tok = Tokenizer.from_pretrained(_write(
        tmp_path / "a", _byte_level(), tokenizer_config={"eos_token": "</s>"},
        generation_config={"eos_token_id": 9}))
    assert tok.eos_token_ids == (9, 1)
    (tmp_path / "b").mkdir()
    tok = Tokenizer.from_pretrained(_write(
        tmp_path / "b", _byte_level(), config={"bos_token_id": 0, "eos_token_id": [1, 3]}))
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, (1, 3))
    # No add_bos_token and a post-processor that adds nothing (Qwen-style): no BOS.
    assert not tok.add_bos_token
    assert tok.encode("def") == tok.encode("def", add_bos=False)


def test_add_bos_follows_post_processor_when_config_is_silent(tmp_path):
    tok = Tokenizer.from_pretrained(_write(
        tmp_path, _sentencepiece_style(), tokenizer_config={"bos_token": "<s>"}))
    assert tok.add_bos_token and tok.encode("hello")[0] == 1


def test_null_bos_means_no_bos(tmp_path):
    tok = Tokenizer.from_pretrained(_write(
        tmp_path, _byte_level(), tokenizer_config={"bos_token": None, "eos_token": "</s>"}))
    assert tok.bos_token_id is None and tok.eos_token_ids == (1,)
    assert tok.encode("def") == tok.encode("def", add_bos=False)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        Tokenizer.from_pretrained(tmp_path / "nope")


def _stream(tokenizer, ids, prompt=()):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    chunks = [detok.add(i) for i in ids]
    assert detok.text == "".join(chunks)
    assert detok.token_ids == list(ids)
    return detok, chunks


def test_incremental_multibyte_never_emits_partial_characters(tokenizer):
    text = MULTIBYTE + "\ndef hello(world): 日本"
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) > len(text) // 2
    detok, chunks = _stream(tokenizer, ids)
    # With byte fallback a character made of byte tokens shows when the next token (or the
    # end of the stream) closes its run.
    chunks.append(detok.flush())
    assert all("\ufffd" not in c for c in chunks)
    assert detok.text == text


def test_incremental_matches_full_decode_in_context(tokenizer):
    # Leading spaces inside the text must survive even though a lone token decodes without it.
    text = "hello world def hello 日本 é"
    prompt = tokenizer.encode("def world")
    ids = tokenizer.encode(" " + text, add_bos=False)
    detok, chunks = _stream(tokenizer, ids, prompt)
    full = tokenizer.decode(prompt + ids)
    assert detok.text == full[len(tokenizer.decode(prompt)):]
    assert " hello world def hello 日本 é" in detok.text


def test_incremental_prompt_ending_mid_character(tokenizer):
    ids = tokenizer.encode("ab 日本語🎉", add_bos=False)
    for cut in range(1, len(ids)):
        prompt_text = tokenizer.decode(ids[:cut])
        detok, chunks = _stream(tokenizer, ids[cut:], ids[:cut])
        chunks.append(detok.flush())
        assert all("\ufffd" not in c for c in chunks)
        assert detok.text == tokenizer.decode(ids)[len(prompt_text.rstrip("\ufffd")):]


def test_incremental_random_ids_equal_full_decode(tokenizer):
    rng = random.Random(0)
    for trial in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        detok, chunks = _stream(tokenizer, ids)
        held = detok.flush()
        assert detok.text == tokenizer.decode(ids), (trial, ids)
        if not tokenizer.byte_fallback_ids:
            assert held == "" or held.endswith("\ufffd")


def test_incremental_ignores_ids_in_a_padded_model_vocab(tokenizer):
    # Models often pad the embedding above the tokenizer's vocab; such an id has no text.
    ids = tokenizer.encode("hello world", add_bos=False)
    detok, _ = _stream(tokenizer, ids[:1] + [tokenizer.vocab_size + 7] + ids[1:])
    assert detok.text + detok.flush() == "hello world"


def test_prompt_unfinished_character_is_not_the_outputs(tokenizer):
    # A prompt ending in part of a character that the output does not complete: the output's
    # text holds no U+FFFD that decoding the output ids alone would not (issue 11).
    ids = tokenizer.encode("日本語🎉 ab", add_bos=False)
    rng = random.Random(1)
    for _ in range(1500):
        cut = rng.randrange(1, len(ids) + 1)
        if rng.random() < 0.5:
            out = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 6))]
        else:
            out = ids[cut:] + [rng.randrange(tokenizer.vocab_size)]
        detok, chunks = _stream(tokenizer, out, ids[:cut])
        text = detok.text + detok.flush()
        assert text.count("\ufffd") <= tokenizer.decode(out).count("\ufffd"), (ids[:cut], out)
