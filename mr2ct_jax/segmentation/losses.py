"""Segmentation losses (JAX): softmax cross-entropy and soft Dice over one-hot labels."""

import jax
import jax.numpy as jnp
import optax

Array = jax.Array


def cross_entropy(logits: Array, labels: Array) -> Array:
  """Mean softmax cross-entropy over all pixels of logits [B,H,W,K] and int labels [B,H,W]."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels.astype(jnp.int32)))


def soft_dice(logits: Array, labels: Array, eps: float = 1.0) -> Array:
  """Mean soft Dice of the foreground classes 1..K-1, summed over the whole batch.

  Per class k: (2 sum p_k t_k + eps) / (sum p_k + sum t_k + eps) with p = softmax(logits) and
  t the one-hot labels. Summing over the batch (not per image) keeps slices without a
  structure from dominating; eps makes a class absent from both prediction and batch count as
  1 (no gradient pull) instead of 0/0.
  """
  num_classes = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)[..., 1:]
  axes = tuple(range(probs.ndim - 1))
  inter = jnp.sum(probs * onehot, axis=axes)
  denom = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  return jnp.mean((2.0 * inter + eps) / (denom + eps))


def segmentation_loss(logits: Array, labels: Array,
                      dice_weight: float) -> tuple[Array, dict[str, Array]]:
  """cross-entropy + dice_weight * (1 - soft Dice); returns (total, {'loss/...': terms})."""
  ce = cross_entropy(logits, labels)
  dice_loss = 1.0 - soft_dice(logits, labels)
  total = ce + dice_weight * dice_loss if dice_weight else ce
  return total, {'loss/total': total, 'loss/ce': ce, 'loss/dice': dice_loss}
