"""The trained model's tokenizer: one word per id of the fact corpus (facts.Vocab), built with
the `tokenizers` library and saved next to the checkpoint, so lm-eval (which speaks text) and
AutoTokenizer load it like any model's."""

from __future__ import annotations

from frameworks.accuracy.facts import SPECIALS, Vocab


def build(vocab: Vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = vocab.words()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[0], bos_token=SPECIALS[1],
                                   eos_token=SPECIALS[2], unk_token=SPECIALS[0])


def text(vocab: Vocab, ids) -> str:
    """Ids of the fact corpus as the tokenizer's words (lm-eval task documents)."""
    words = vocab.words()
    return " ".join(words[int(i)] for i in ids)
