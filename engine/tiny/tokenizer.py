"""A byte-level CLIP tokenizer (every character a token): the tiny model's, and the one the full-size
random SDXL of the GPU benchmarks uses (engine/sdxl_configs.py). A leaf module: it imports no model code."""

from __future__ import annotations


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for raw bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return list(symbols.values())


def _byte_vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


VOCAB_SIZE = 2 * 256 + 2
BOS, EOS = VOCAB_SIZE - 2, VOCAB_SIZE - 1


def build_tiny_tokenizer():
    """A byte-level CLIP tokenizer (no merges): every character is a token."""
    from transformers import CLIPTokenizer

    # transformers 5 ignores vocab_file/merges_file arguments: pass the vocab itself.
    return CLIPTokenizer(
        vocab=_byte_vocab(),
        merges=[],
        model_max_length=77,
        pad_token="<|endoftext|>",
    )
