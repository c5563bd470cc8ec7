"""Text in: reading a corpus (`files`) and turning text into token ids and back (`tokenizer`).

    from choicelm.text import Tokenizer
    tok = Tokenizer.train(["corpus/"], vocab_size=8192)
"""

from .files import TextStats, iter_text_files, list_text_files, read_text_file
from .tokenizer import EOT, MASK, PAD, SPECIAL_TOKENS, Tokenizer, read_chat_template, read_special_tokens, split_text

__all__ = ["EOT", "MASK", "PAD", "SPECIAL_TOKENS", "TextStats", "Tokenizer", "iter_text_files", "list_text_files",
           "read_chat_template", "read_special_tokens", "read_text_file", "split_text"]
