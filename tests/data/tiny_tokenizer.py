"""A word-level fast tokenizer built in memory (no files, no network) for data tests."""

import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

SPECIALS = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[EOS]']
WORDS = [
    'good', 'bad', 'film', 'movie', 'great', 'awful', 'plot', 'acting', 'the', 'a', 'is',
    'was', 'very', 'not', 'and', 'of', 'to', 'it', 'to', 'be', 'or', 'question', 'whether',
    'nobler', 'mind', 'suffer', 'slings', 'arrows', 'outrageous', 'fortune',
]


def make_tokenizer(*, cls_sep: bool = True) -> transformers.PreTrainedTokenizerFast:
    """Ids: [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [EOS]=4, then one id per word of ``WORDS``."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single='[CLS] $A [SEP]', special_tokens=[('[CLS]', 2), ('[SEP]', 3)]
        )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token='[PAD]',
        unk_token='[UNK]',
        cls_token='[CLS]',
        sep_token='[SEP]',
        eos_token='[EOS]',
    )
