"""What the phone runs for next-word prediction: token ids in, logits per position out, and the vocabulary.

Turning typed words into ids is string work TFLite's builtin ops do not do, so the app
does it with `vocab.txt` (line i is the word, or special token, of id i): words are
ids 1..V in the file's order, `<oov>` (hashed buckets, `<oov1>`, ... if several),
`<bos>` and `<eos>` follow, and 0 is `<pad>`, exactly TFF's Stack Overflow ids
(`task.special_tokens`). The signature is one sequence of `sequence_length` ids,
padded with 0, starting with `<bos>`.
"""

from __future__ import annotations

from tffpipe import configs, export
from tffpipe.tasks.keyboard import files, task

TOP_K = 3  # a keyboard shows three suggestions


def vocabulary_lines(text: configs.TextConfig, vocab: list[str]) -> list[str]:
    """Token of each id, in id order: <pad>, the words, the out-of-vocabulary buckets, <bos>, <eos>."""
    tokens = task.special_tokens(text)
    lines = ["", *vocab] + [""] * (len(tokens.out_of_vocab) + 2)
    lines[tokens.padding] = "<pad>"
    for i, oov in enumerate(tokens.out_of_vocab):
        lines[oov] = "<oov>" if len(tokens.out_of_vocab) == 1 else f"<oov{i + 1}>"
    lines[tokens.beginning_of_sentence] = "<bos>"
    lines[tokens.end_of_sentence] = "<eos>"
    return lines


def create_serving_spec(config: configs.ExperimentConfig, data_dir: str) -> export.ServingSpec:
    text = config.data.text
    vocab = files.read_vocabulary(data_dir, text.vocab_size)
    return export.ServingSpec(
        input_shape=(text.sequence_length,),
        input_dtype="int64",
        input_name="ids",
        ignored_targets=tuple(task.masked_for_accuracy(text)),
        top_k=TOP_K,
        files={"vocab.txt": "\n".join(vocabulary_lines(text, vocab)) + "\n"},
    )
