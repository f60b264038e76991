"""Hugging Face `tokenizer.json` through `tokenizers`, plus streaming (incremental) detokenization.

Special-token ids come from the files a Hugging Face model folder carries: `tokenizer_config.json`
(what the tokenizer adds: `bos_token`, `eos_token`, `add_bos_token`), `generation_config.json`
(the ids generation stops on, often a richer list than the tokenizer's one EOS) and, when neither
says, `config.json`.

Chat templates are not rendered: they are Jinja programs and jinja2 is not a jaxserve dependency.
The raw template is kept in `Tokenizer.chat_template` for callers that have jinja2.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

import tokenizers

_REPLACEMENT = "\ufffd"  # what a decode shows for bytes that are not (yet) a whole character


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value) -> str | None:
    """tokenizer_config.json writes a special token as a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


class Tokenizer:
    """A model's tokenizer: `encode` text to ids (with the BOS the model expects), `decode` back."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token_id: int | None = None,
                 eos_token_ids: Sequence[int] = (), add_bos_token: bool | None = None,
                 chat_template: str | None = None):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        if add_bos_token is None:
            # No explicit setting: do what the tokenizer's own post-processor does (Llama 3's
            # template adds <|begin_of_text|>; Qwen's adds nothing).
            with_specials = tokenizer.encode("", add_special_tokens=True).ids
            add_bos_token = bos_token_id is not None and with_specials[:1] == [bos_token_id]
        self.add_bos_token = bool(add_bos_token) and bos_token_id is not None
        self.chat_template = chat_template
        added = tokenizer.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        # SentencePiece byte fallback ("<0xE6>"): the decoder turns each run of such tokens into
        # UTF-8 as a whole, all of it U+FFFD when any part is invalid. Streaming needs to know.
        byte_ids = ()
        if getattr(tokenizer.model, "byte_fallback", False):
            byte_ids = (tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self.byte_fallback_ids = frozenset(i for i in byte_ids if i is not None)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads a Hugging Face model folder (or a `tokenizer.json` file directly)."""
        path = os.fspath(path)
        if os.path.isfile(path):
            tok_path, folder = path, os.path.dirname(path)
        else:
            tok_path, folder = os.path.join(path, "tokenizer.json"), path
        if not os.path.isfile(tok_path):
            raise FileNotFoundError(
                f"no tokenizer.json at {tok_path!r} (jaxserve reads only the fast-tokenizer "
                f"file; convert a SentencePiece model with transformers first)")
        tok = tokenizers.Tokenizer.from_file(tok_path)
        tok_cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        gen_cfg = _read_json(os.path.join(folder, "generation_config.json"))
        model_cfg = _read_json(os.path.join(folder, "config.json"))

        def token_id(key: str) -> int | None:
            content = _token_content(tok_cfg.get(key))
            return None if content is None else tok.token_to_id(content)

        bos = token_id("bos_token")
        if bos is None:
            bos = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))
        eos: list[int] = list(_ids(gen_cfg.get("eos_token_id")))
        tok_eos = token_id("eos_token")
        if tok_eos is not None and tok_eos not in eos:
            eos.append(tok_eos)
        if not eos:
            eos = list(_ids(model_cfg.get("eos_token_id")))
        template = tok_cfg.get("chat_template")
        return cls(tok, bos_token_id=bos, eos_token_ids=eos,
                   add_bos_token=tok_cfg.get("add_bos_token"),
                   chat_template=template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        """Tokens the tokenizer knows, added tokens included (a model may pad its vocab above)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`, preceded by BOS when `add_bos` and the model uses one."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (special tokens left out unless `skip_special_tokens=False`)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _leading(text: str) -> int:
    return len(text) - len(text.lstrip(_REPLACEMENT))


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into text, one `add` at a time.

    Decoding one token alone is wrong in two ways: a byte-level token may hold only part of a
    UTF-8 character, and SentencePiece-style decoders treat a token differently at the start of
    a text (the leading space is dropped) than in context. So each step decodes a small window
    of earlier tokens plus the new ones and emits what the new ones added to the window's text,
    holding output back while it ends in an unfinished character (or, with byte fallback, inside
    a run of byte tokens, which the decoder converts as a whole). The emitted text, plus `flush`
    at the end, equals the full decode.
    """

    _PROMPT_CONTEXT = 5  # prompt tokens of context for the first window

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._bytes = tokenizer.byte_fallback_ids
        self._ids: list[int] = [int(i) for i in prompt_ids]
        self._num_prompt = len(self._ids)
        self._read = len(self._ids)  # tokens whose text has been emitted (or is the prompt)
        prefix = max(self._read - self._PROMPT_CONTEXT, 0)  # start of the context window
        while prefix > 0 and self._in_byte_run(self._ids[prefix - 1]):
            prefix -= 1  # never start a window inside a byte run: it would all decode as U+FFFD
        self._prefix = prefix
        self._chunks: list[str] = []

    def _transparent(self, token_id: int) -> bool:
        return self._skip and token_id in self._tokenizer.special_token_ids

    def _in_byte_run(self, token_id: int) -> bool:
        return token_id in self._bytes or (bool(self._bytes) and self._transparent(token_id))

    def _decode(self, ids: Sequence[int]) -> str:
        # Unchecked: an id in a model's padded vocab above the tokenizer's has no text, and a
        # stream should not fail on it (the tokenizers library skips such ids).
        return self._tokenizer._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Appends one token; returns the text it completed (often "", never half a character)."""
        token_id = int(token_id)
        self._ids.append(token_id)
        if self._bytes:
            last = next((i for i in reversed(self._ids[self._read:])
                         if not self._transparent(i)), None)
            if last is None or last in self._bytes:
                return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        if self._read == self._num_prompt:
            # A prompt that ends mid-character: the completed character is output, not prompt.
            prefix_text = prefix_text.rstrip(_REPLACEMENT)
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT):
            return ""
        return self._emit(self._own(new_text[len(prefix_text):]))

    def flush(self) -> str:
        """At the end of a stream: the held-back text (an unfinished character shows as U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        if self._read == self._num_prompt:
            prefix_text = prefix_text.rstrip(_REPLACEMENT)
        return self._emit(self._own(self._decode(self._ids[self._prefix:])[len(prefix_text):]))

    def _own(self, delta: str) -> str:
        """The first text after a prompt that ends mid-character: a U+FFFD there stands for the
        prompt's unfinished bytes when the output did not complete them. Those are the prompt's,
        not the output's: the output's text never holds a U+FFFD that decoding the output ids
        alone would not."""
        if self._read != self._num_prompt or not delta.startswith(_REPLACEMENT):
            return delta
        alone = self._decode(self._ids[self._num_prompt:])
        extra = _leading(delta) - _leading(alone)
        return delta[extra:] if extra > 0 else delta

    def _emit(self, delta: str) -> str:
        self._prefix, self._read = self._read, len(self._ids)
        if delta:
            self._chunks.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._chunks)

    @property
    def token_ids(self) -> list[int]:
        """The ids added so far (without the prompt)."""
        return self._ids[self._num_prompt:]
