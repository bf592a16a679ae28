"""The eval loss of a ``--save-model`` directory, reloaded in one process (the tests of the trainers use it)."""
import torch


def eval_loss_of_saved_model(model_dir, eval_records, max_length: int) -> float:
    """Token-weighted SFT loss of ``eval_records`` under the saved model, one record at a time (no padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from recipes.posttrain import data
    from recipes.posttrain.losses import sft_loss_terms
    from recipes.posttrain.trainer import pad_id

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = data.Tokeniser(tokenizer, max_length, "truncate", 0.05).sft(eval_records, "eval").examples
    total = count = 0.0
    with torch.no_grad():
        for example in examples:
            batch = data.collate([example], "sft", pad_id(tokenizer))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            t, c = sft_loss_terms(logits, batch["labels"])
            total, count = total + float(t), count + float(c)
    return total / count


# The run scored the same weights in padded batches on 2 ranks: fp32 forwards differ by rounding only
# (~1e-6 relative per token at these sizes); 1e-4 relative leaves two orders of margin and still catches any
# wrong or missing weight (a changed weight moves the loss by far more).
SAVED_MODEL_RTOL = 1e-4
