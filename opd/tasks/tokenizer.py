"""Character-level tokenizer for the embedded arithmetic task.

One token per character keeps every digit its own token, so a tiny model sees the column structure of an
addition directly instead of having to learn how a BPE vocabulary happened to merge digit runs. Nothing comes
from a model hub (the service must run offline), so the vocabulary is built here, deterministically: the same
ids on every machine, which matters because teacher, student and vLLM must all agree on them.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, SYSTEM, USER, ASSISTANT, END = (
    "<|pad|>",
    "<|unk|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
)
SPECIAL_TOKENS = [PAD, UNK, SYSTEM, USER, ASSISTANT, END]

# Only the assistant turn is closed by <|end|>: that is the token generation stops on, and prompts end with a
# bare <|assistant|> so the model's first sampled token is already the answer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}<|end|>"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Special tokens first (pad = 0), then newline and printable ASCII in code-point order."""
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    # Split into single characters, keeping whitespace as tokens of its own: a space in a prompt must survive
    # a decode, so no whitespace pre-tokenizer (it would drop spaces) and a plain concatenating decoder.
    core = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        eos_token=END,
        additional_special_tokens=[SYSTEM, USER, ASSISTANT],
        padding_side="left",  # decoder-only generation pads on the left
        clean_up_tokenization_spaces=False,
        model_max_length=128,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
