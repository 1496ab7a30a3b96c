"""A byte-level `transformers` tokenizer that needs no download: one token per UTF-8 byte.

Ids 0..255 are the bytes themselves; 256, 257 and 258 are the pad, bos and eos tokens. It is a
`PreTrainedTokenizerFast` over a `tokenizers` byte-level BPE model with no merges, so
`save_pretrained` / `AutoTokenizer.from_pretrained` round-trip it like any Hugging Face tokenizer.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|eos|>"
VOCAB_SIZE = 259

# One line per message, "role: content"; the generation prompt opens the assistant's line.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: a printable character for each byte (GPT-2's mapping)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """The byte-level tokenizer: 256 byte tokens, then pad (256), bos (257) and eos (258)."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False)
