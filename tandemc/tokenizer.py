"""Tokenizers: the built-in byte-level one, and Hugging Face `tokenizer.json` through the `tokenizers` package."""

from __future__ import annotations

from pathlib import Path

from tandemc.config import BYTE_VOCAB, TokenizerConfig
from tandemc.errors import TandemcError


class ByteTokenizer:
    """Token i < 256 is byte i; then BOS, EOS, PAD. Decoding drops special tokens and replaces invalid UTF-8."""

    vocab_size = BYTE_VOCAB
    bos_id, eos_id, pad_id = 256, 257, 258

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(utf8(text))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def token(self, token_id: int) -> str:
        """The special tokens' names as `tandemc export-hf` writes them; a byte's character otherwise."""
        names = {self.bos_id: "<bos>", self.eos_id: "<eos>", self.pad_id: "<pad>"}
        return names.get(token_id, chr(token_id) if 0 <= token_id < 256 else "")


class HFTokenizer:
    """A `tokenizer.json`; special tokens are named in the checkpoint config (empty name: none)."""

    def __init__(self, path: Path, cfg: TokenizerConfig):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TandemcError("this checkpoint uses a Hugging Face tokenizer.json; install the 'tokenizers' "
                               "package (pip install 'tandemc[hf]')") from None
        if not path.is_file():
            raise TandemcError(f"tokenizer file {path.name} named by config field 'tokenizer.file' is missing")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises plain Exception subclasses
            raise TandemcError(f"{path.name} is not a valid tokenizer.json: {str(e).splitlines()[0]}") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id, self.eos_id, self.pad_id = (self._special(cfg.bos_token, "bos_token"),
                                                 self._special(cfg.eos_token, "eos_token"),
                                                 self._special(cfg.pad_token, "pad_token"))

    def _special(self, token: str, field: str) -> int:
        if not token:
            return -1
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TandemcError(f"config field 'tokenizer.{field}' names {token!r}, which is not in the tokenizer")
        return token_id

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(utf8(text).decode("utf-8"), add_special_tokens=False).ids
        return ([self.bos_id] if add_bos and self.bos_id >= 0 else []) + ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def token(self, token_id: int) -> str:
        """The token's text ("" for -1, no such token)."""
        return (self._tok.id_to_token(token_id) or "") if token_id >= 0 else ""


def load_tokenizer(cfg: TokenizerConfig, directory: Path | None):
    if cfg.type == "byte":
        return ByteTokenizer()
    if directory is None:
        raise TandemcError("a Hugging Face tokenizer needs the checkpoint directory")
    return HFTokenizer(directory / cfg.file, cfg)


def render_chat(template: str, user_text: str, tokenizer) -> str:
    """One user turn through the model's chat template, ready for the assistant's reply (as Hugging Face's
    `apply_chat_template(..., add_generation_prompt=True, tokenize=False)` renders it). The template comes from a
    checkpoint or artifact, so it runs in Jinja's immutable sandbox."""
    if not template:
        raise TandemcError("this model has no chat template; drop --chat and write the prompt in full")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise TandemcError("--chat renders the model's Jinja chat template: pip install jinja2") from None

    def raise_exception(message):
        raise TandemcError(f"the chat template refused the conversation: {message}")

    special = {name: tokenizer.token(getattr(tokenizer, f"{name}_id")) for name in ("bos", "eos", "pad")}
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": user_text}], add_generation_prompt=True,
            bos_token=special["bos"], eos_token=special["eos"], pad_token=special["pad"])
    except TemplateError as e:
        raise TandemcError(f"the model's chat template does not render: {str(e).splitlines()[0]}") from None


def utf8(text: str) -> bytes:
    """Prompt text as UTF-8; text that is not (bytes a shell passed through undecoded) is refused in one line."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TandemcError(f"the prompt is not valid UTF-8 text (undecodable byte at character {e.start}); pass "
                           "UTF-8") from None
