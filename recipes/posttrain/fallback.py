"""The built-in fallback: a synthetic task, a character tokenizer and a tiny random Llama.

Used only when neither ``../shared/data`` nor the Hugging Face hub is reachable, so that the
quickstart still runs end to end on a bare machine. Nothing here is pretrained or real data: every
run that uses it logs ``FALLBACK`` loudly and marks its metrics with ``"fallback": true``.

The synthetic SFT task is "reverse / sort / count the letters of a word"; the DPO task prefers the
correct answer over a corrupted one. Both are learnable by a ~100K-parameter model in a few hundred
steps, which is all the fallback has to show.
"""
from __future__ import annotations

import string
from typing import List

import numpy as np

FALLBACK_BANNER = ("=" * 78 + "\nFALLBACK: no real model/data found (neither ../shared/data nor the hub); "
                   "training a tiny RANDOMLY INITIALISED Llama\non a BUILT-IN SYNTHETIC task. "
                   "Numbers from this run say nothing about real post-training.\n" + "=" * 78)

_ALPHABET = string.ascii_lowercase


def _word(rng: np.random.RandomState) -> str:
    return "".join(rng.choice(list(_ALPHABET), size=rng.randint(3, 9)))


def _solve(kind: str, word: str) -> str:
    if kind == "reverse":
        return word[::-1]
    if kind == "sort":
        return "".join(sorted(word))
    return str(len(word))


def synthetic_records(task: str, count: int, seed: int = 0) -> List[dict]:
    rng = np.random.RandomState(seed)
    records = []
    for _ in range(count):
        kind = ("reverse", "sort", "count")[rng.randint(3)]
        word = _word(rng)
        answer = _solve(kind, word)
        if task == "sft":
            records.append({"instruction": f"{kind} the letters", "input": word, "output": answer})
        else:
            wrong = answer[::-1] + "x" if answer[::-1] != answer else answer + "x"
            records.append({"prompt": f"{kind} the letters of {word}: ", "chosen": answer, "rejected": wrong})
    return records


def char_tokenizer():
    """A byte-free character-level fast tokenizer with <unk>/<s>/</s>/<pad>, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def tiny_llama(vocab_size: int, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
