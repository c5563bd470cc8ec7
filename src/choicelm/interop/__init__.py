"""Hugging Face interoperability: checkpoints and tokenizers in and out.

    from choicelm.interop import from_hf, to_hf
    from_hf("hf/gpt2", "ckpt/gpt2")     # GPT-2 / Llama / Mixtral / BERT / Marian folder -> choicelm checkpoint
    from_hf("hf/opus", "ckpt/opus", tokenizer="tok/")  # Marian: its SentencePiece tokenizer needs a tokenizer.json
    to_hf("runs/x", "hf/x")             # choicelm GPT (dense or token-choice MoE) -> folder transformers loads

SUPPORTED lists the architectures from_hf reads, EXPORTABLE those to_hf writes. hf.py handles the files; each
family's mapping lives beside it (models/gpt_hf.py, bert_hf.py, seq2seq_hf.py), found through models/registry.py.
tiktoken_bpe converts a tiktoken BPE file (e.g. GPT-2's) into vocab.json / merges.txt.
Nothing here imports transformers.
"""

from ..models.seq2seq_hf import state_dict_from_hf_marian
from .hf import (EXPORTABLE, SUPPORTED, ConversionError, from_hf, hf_config_from_model, load_hf_model,
                 load_hf_tokenizer, model_config_from_hf, read_hf_model, to_hf)

__all__ = ["EXPORTABLE", "SUPPORTED", "ConversionError", "from_hf", "hf_config_from_model", "load_hf_model",
           "load_hf_tokenizer", "model_config_from_hf", "read_hf_model", "state_dict_from_hf_marian", "to_hf"]
