"""Hugging Face interoperability: checkpoints and tokenizers in and out.

    from choicelm.interop import from_hf, to_hf
    from_hf("hf/gpt2", "ckpt/gpt2")     # GPT2LMHeadModel / LlamaForCausalLM folder -> choicelm checkpoint
    to_hf("runs/x", "hf/x")             # choicelm checkpoint -> folder that transformers loads

tiktoken_bpe converts a tiktoken BPE file (e.g. GPT-2's) into vocab.json / merges.txt.
Nothing here imports transformers.
"""

from .hf import (SUPPORTED, ConversionError, from_hf, hf_config_from_model, load_hf_model, load_hf_tokenizer,
                 model_config_from_hf, read_hf_model, to_hf)

__all__ = ["SUPPORTED", "ConversionError", "from_hf", "hf_config_from_model", "load_hf_model", "load_hf_tokenizer",
           "model_config_from_hf", "read_hf_model", "to_hf"]
