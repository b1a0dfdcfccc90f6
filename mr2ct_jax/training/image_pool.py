"""A functional history of synthesised images for a discriminator (Shrivastava et al. 2017).

The CycleGAN reference keeps the last 50 fakes per discriminator and trains D on a mix of
current and older fakes. Here the pool is a pytree in the train state and `query` is a pure
function, so it runs inside the jitted step and is saved in checkpoints.

The rule, per image of the batch, in batch order (as the reference's `ImagePool.query`):
  - while the pool is not full: store the new image and return it;
  - when full: with probability 0.5 return a uniformly chosen stored image and put the new
    image in its place; otherwise return the new image.
"""

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ImagePool:
  """Stored images and how many slots are filled.

  Attributes:
    images: [pool_size, H, W, C]; slots >= count are zeros.
    count: int32 scalar, the number of filled slots (<= pool_size).
  """
  images: jax.Array
  count: jax.Array

  @property
  def pool_size(self) -> int:
    return self.images.shape[0]


def init(pool_size: int, image_shape: tuple[int, ...], dtype=jnp.float32) -> ImagePool:
  """An empty pool of `pool_size` images of `image_shape` ([H, W, C]); size 0 is allowed."""
  if pool_size < 0:
    raise ValueError(f'image_pool.init: pool_size must be >= 0, got {pool_size}')
  return ImagePool(images=jnp.zeros((pool_size, *image_shape), dtype),
                   count=jnp.zeros((), jnp.int32))


def query(pool: ImagePool, images: jax.Array, rng: jax.Array) -> tuple[ImagePool, jax.Array]:
  """Passes a batch through the pool.

  Args:
    pool: the current pool.
    images: [B, H, W, C] newly synthesised images (callers pass them with stop_gradient).
    rng: a PRNG key; consumed here.

  Returns:
    (new_pool, returned_images [B, H, W, C]). With pool_size 0 the batch is returned as is.
  """
  size = pool.pool_size
  if size == 0:
    return pool, images
  batch = images.shape[0]
  coin_key, slot_key = jax.random.split(rng)
  # Draw all randomness up front: a coin and a candidate slot per image.
  swap = jax.random.uniform(coin_key, (batch,)) > 0.5
  slots = jax.random.randint(slot_key, (batch,), 0, size)

  def one(carry, inputs):
    stored, count = carry
    image, coin, slot = inputs
    filling = count < size
    # Filling: write at `count`, return the new image. Full and coin: swap with `slot`.
    # Full and no coin: the slot's own content is written back (a no-op), which keeps the
    # update a single unconditional scatter.
    index = jnp.where(filling, count, slot)
    old = stored[index]
    write = filling | coin
    returned = jnp.where(filling | ~coin, image, old)
    stored = stored.at[index].set(jnp.where(write, image, old))
    return (stored, jnp.minimum(count + 1, size)), returned

  (stored, count), returned = jax.lax.scan(one, (pool.images, pool.count),
                                           (images.astype(pool.images.dtype), swap, slots))
  return ImagePool(images=stored, count=count), returned.astype(images.dtype)
