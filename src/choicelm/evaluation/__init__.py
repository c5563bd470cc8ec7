"""Every metric of a trained model, in one package:

    perplexity   loss, perplexity and bits per byte on prepared token shards, scored alike for every model
                 kind (`choicelm evaluate --metrics ppl`)
    metrics      task metrics: accuracy/F1 (scikit-learn), BLEU (sacrebleu), ROUGE (rouge-score)
    tasks        the task metrics of a fine-tuned model on a file (`choicelm evaluate --data FILE`, and the end
                 of `choicelm finetune`)

    from choicelm.evaluation import perplexity
    perplexity(choicelm.load("runs/shakespeare"), "demo/data")  # {"loss": ..., "ppl": ..., ...}
"""

from .perplexity import compare, evaluate, format_table, perplexity, unigram_perplexity

__all__ = ["compare", "evaluate", "format_table", "perplexity", "unigram_perplexity"]
