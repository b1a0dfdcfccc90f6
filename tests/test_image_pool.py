"""The functional image pool: the reference's fill-then-50%-swap rule, exactly and in law."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mr2ct_jax.training import image_pool

# Images are 1x1x1 and carry their id as value, so what comes back can be traced.
query = jax.jit(image_pool.query)


def _images(ids) -> jnp.ndarray:
  return jnp.asarray(np.asarray(ids, np.float32).reshape(-1, 1, 1, 1))


def _ids(images) -> list[int]:
  return [int(v) for v in np.asarray(images).reshape(-1)]


def test_size_zero_is_identity():
  pool = image_pool.init(0, (4, 4, 1))
  images = jnp.arange(32, dtype=jnp.float32).reshape(2, 4, 4, 1)
  new_pool, out = image_pool.query(pool, images, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, images)
  assert new_pool.images.shape == (0, 4, 4, 1)


def test_fills_then_swaps_exactly():
  pool = image_pool.init(4, (1, 1, 1))
  assert int(pool.count) == 0
  # Filling: every new image is stored in order and returned unchanged.
  pool, out = query(pool, _images([1, 2, 3]), jax.random.PRNGKey(0))
  assert _ids(out) == [1, 2, 3]
  assert int(pool.count) == 3 and _ids(pool.images) == [1, 2, 3, 0]

  # The rest replays the reference's Python loop with the same draws the function makes.
  stored, count = [1, 2, 3, 0], 3
  for step, key in enumerate(jax.random.split(jax.random.PRNGKey(1), 6)):
    new = [10 * (step + 1) + i for i in range(5)]
    coin_key, slot_key = jax.random.split(key)
    coins = np.asarray(jax.random.uniform(coin_key, (5,)) > 0.5)
    slots = np.asarray(jax.random.randint(slot_key, (5,), 0, 4))
    expected = []
    for image, coin, slot in zip(new, coins, slots):
      if count < 4:
        stored[count] = image
        count += 1
        expected.append(image)
      elif coin:
        expected.append(stored[slot])
        stored[slot] = image
      else:
        expected.append(image)
    pool, out = query(pool, _images(new), key)
    assert _ids(out) == expected, step
    assert _ids(pool.images) == stored, step
    assert int(pool.count) == count == 4


def test_swap_statistics():
  size, batch = 8, 4000
  pool, _ = query(image_pool.init(size, (1, 1, 1)), _images(range(size)),
                  jax.random.PRNGKey(0))
  new_ids = np.arange(1000, 1000 + batch)
  pool, out = query(pool, _images(new_ids), jax.random.PRNGKey(2))
  out = np.asarray(out).reshape(-1)
  swapped = out != new_ids
  # Half of the images are swapped for a stored one (binomial sd = 0.008 here).
  assert swapped.mean() == pytest.approx(0.5, abs=0.04)
  # A swapped-out image is one stored earlier: an initial one or an earlier new one.
  assert np.all((out[swapped] < size) | (out[swapped] < new_ids[swapped]))
  # Every image fed in is either returned now, in the pool, or was returned later by a swap.
  kept = set(_ids(pool.images))
  later = set(out[swapped].astype(int).tolist())
  for i, image in enumerate(new_ids):
    assert (not swapped[i]) or image in kept or image in later
  # Slots are chosen uniformly: the 8 initial images are all swapped out early on.
  assert set(range(size)) <= later


def test_query_keeps_dtype_and_shape():
  pool = image_pool.init(3, (4, 4, 1))
  images = jnp.ones((5, 4, 4, 1), jnp.float32)
  pool, out = query(pool, images, jax.random.PRNGKey(0))
  assert out.shape == images.shape and out.dtype == images.dtype
  assert pool.images.shape == (3, 4, 4, 1) and int(pool.count) == 3


def test_negative_size_rejected():
  with pytest.raises(ValueError, match='pool_size'):
    image_pool.init(-1, (4, 4, 1))
