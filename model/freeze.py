"""Train only the top of the network: the last N transformer blocks, the final norm and the output head.

    freeze_all_but_top(model, 2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

The first num_hidden_layers - N blocks run under torch.no_grad() in the forward (`Transformer.frozen_layers`),
so no graph is built through them and none of their activations is kept for the backward.
"""
from __future__ import annotations

from .lora import lora_layers
from .transformer import Transformer


def freeze_all_but_top(model: Transformer, n: int) -> Transformer:
    """requires_grad only on the top `n` blocks, the final norm and lm_head (0 <= n <= num_hidden_layers);
    the token embeddings and the bottom blocks are frozen, and the bottom blocks run without autograd.

    Tied embeddings (tie_word_embeddings): lm_head.weight is the embedding matrix, which the frozen bottom
    reads; it stays frozen, so the trainable part is the top blocks and the final norm. Not combined with LoRA
    (which freezes every base weight itself): raises ValueError on a model with adapters. Returns the model."""
    layers = model.config.num_hidden_layers
    if not 0 <= n <= layers:
        raise ValueError(f"trainable layers must be between 0 and {layers} (got {n})")
    if lora_layers(model):
        raise ValueError("freeze_all_but_top on a model with LoRA adapters: use one or the other")
    model.requires_grad_(False)
    for block in model.model.layers[layers - n:]:
        block.requires_grad_(True)
    model.model.norm.requires_grad_(True)
    if not model.config.tie_word_embeddings:
        model.lm_head.requires_grad_(True)
    model.frozen_layers = layers - n
    return model
