"""Zero-shot evaluation: perplexity, LAMBADA and cloze scoring, every method choice explicit.

GPT-2's zero-shot table (Radford et al., 2019, "Language Models are Unsupervised Multitask
Learners", section 3) moves by several points with choices the paper leaves implicit: how long a
window is and how far it moves, whether the text is detokenized first, whether a LAMBADA answer is
the whole last word or only its last token, whether an <|endoftext|> starts the text. Here each
choice is a keyword argument, echoed in the results, and described in docs/evaluation.md.

Five kinds of task:

- perplexity (WikiText, PTB, enwik8, text8): the text is tokenized once and scored by a sliding
  window (`sliding_windows`): every token but the first is predicted exactly once, from up to
  `max_length` tokens of context (`perplexity`);
- LAMBADA: the last word of a passage, `" " + word`, must be predicted greedily, every one of its
  tokens (`lambada`);
- cloze (CBT): each candidate completes the sentence; the completion with the highest
  log-likelihood wins (`multiple_choice`, `cbt`);
- separate lines (One Billion Word): each line is its own document after <|endoftext|>
  (`line_perplexity`);
- summaries (CNN/DailyMail): the article, `"\\nTL;DR:"`, 100 tokens sampled with top-k 2, the
  first three sentences scored with ROUGE (`summarize`; ROUGE needs the `eval` extra).

The package:

- `methods`: the methods above, on gpt2np.scoring's log-probabilities of chosen tokens (its
  `score_tokens`, `sliding_windows` and `target_log_probs` are re-exported here);
- `data`: reading the test files, the detokenizers, and LAMBADA's checksum-pinned download;
- `summaries`: zero-shot summaries and their ROUGE (rouge-score, imported only when used);
- `tasks`: the model card's table (`TASKS`) and `evaluate_task`, which runs one row of it;
- `command`: `gpt2np eval`.

Everything a user calls is importable from `gpt2np.evaluate` itself.
"""

from ..scoring import DEFAULT_BATCH_SIZE, DEFAULT_STRIDE, score_tokens, sliding_windows, target_log_probs
from .command import build_parser, format_table, main
from .data import (
    CLOZE_BLANK,
    DETOKENIZERS,
    LAMBADA_SOURCE,
    SUMMARY_FIELDS,
    ClozeExample,
    DataSource,
    SummaryExample,
    billion_word_detokenize,
    cbt_detokenize,
    dataset_cache_dir,
    detokenize,
    download,
    no_detokenize,
    ptb_detokenize,
    read_cbt,
    read_char_test,
    read_cnn_dailymail,
    read_lambada,
    read_text,
    wikitext_detokenize,
)
from .methods import (
    cbt,
    cloze_choices,
    count_words,
    lambada,
    line_perplexity,
    multiple_choice,
    perplexity,
    score_continuations,
    score_lines,
    split_last_word,
)
from .summaries import (
    PAPER_FIGURES,
    PAPER_SUFFIX,
    ROUGE_TYPES,
    MissingExtra,
    format_summary_table,
    rouge,
    split_sentences,
    summarize,
    summary_of,
    summary_prompt,
)
from .tasks import TASKS, Task, evaluate_task

__all__ = [
    "CLOZE_BLANK",
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_STRIDE",
    "DETOKENIZERS",
    "LAMBADA_SOURCE",
    "TASKS",
    "ClozeExample",
    "DataSource",
    "Task",
    "build_parser",
    "cbt",
    "cbt_detokenize",
    "cloze_choices",
    "count_words",
    "dataset_cache_dir",
    "detokenize",
    "download",
    "evaluate_task",
    "format_table",
    "lambada",
    "main",
    "multiple_choice",
    "no_detokenize",
    "perplexity",
    "ptb_detokenize",
    "read_cbt",
    "read_char_test",
    "read_lambada",
    "read_text",
    "score_continuations",
    "score_tokens",
    "sliding_windows",
    "split_last_word",
    "target_log_probs",
    "wikitext_detokenize",
    "MissingExtra",
    "PAPER_FIGURES",
    "PAPER_SUFFIX",
    "ROUGE_TYPES",
    "SUMMARY_FIELDS",
    "SummaryExample",
    "billion_word_detokenize",
    "format_summary_table",
    "line_perplexity",
    "read_cnn_dailymail",
    "rouge",
    "score_lines",
    "split_sentences",
    "summarize",
    "summary_of",
    "summary_prompt",
]
