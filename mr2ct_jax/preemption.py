"""Graceful stops for both trainers: SIGTERM or SIGINT finish the step, save, exit 75.

Cloud GPUs and TPU VMs are pre-empted with SIGTERM, and Ctrl-C sends SIGINT. While a trainer
runs inside `StopSignals`, either signal only sets a flag: the current step finishes, the
trainer writes a checkpoint of that step and raises `Preempted`, and the command prints one
line and exits with `EXIT_PREEMPTED` (EX_TEMPFAIL: not finished, run it again), which job
schedulers read as "requeue". A second signal while the checkpoint is being written is
absorbed the same way, so it cannot leave a half-written checkpoint behind (a SIGKILL cannot
either: Orbax writes each checkpoint under a temporary name and renames it when complete).

On several processes each one may receive the signal at a different step, so the flag is
combined over all processes every step (`should_stop`): they stop together, at the same step.
"""

import os
import signal
import threading
import types

import jax
from jax.experimental import multihost_utils
import numpy as np

from mr2ct_jax.cli import commands

EXIT_PREEMPTED = commands.EXIT_NOT_FINISHED  # os.EX_TEMPFAIL
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after saving a checkpoint; the message is the user's line.

  `exit_status` tells the command runner (`mr2ct_jax.cli.commands`) how to exit.
  """

  exit_status = EXIT_PREEMPTED

  def __init__(self, step: int, what: str = 'training'):
    self.step = int(step)
    super().__init__(f'{what} stopped at step {self.step}, checkpoint saved; run the same '
                     'command to resume')


class StopSignals:
  """Context manager: inside it SIGTERM and SIGINT request a stop instead of ending the process.

  Outside the main thread (where Python cannot install signal handlers) it does nothing and
  signals keep their usual effect.
  """

  def __init__(self) -> None:
    self._requested = False
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: types.FrameType | None) -> None:
    del frame  # unused
    again = self._requested
    self._requested = True  # first: the message below must not be able to lose the request
    text = ('already stopping; SIGKILL ends it at once' if again else
            'stopping after this step and saving a checkpoint')
    # os.write, not print: the signal may interrupt a write to sys.stderr in progress.
    os.write(2, f'{signal.Signals(signum).name}: {text}\n'.encode())

  def __enter__(self) -> 'StopSignals':
    if threading.current_thread() is threading.main_thread():
      for signum in SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  @property
  def requested(self) -> bool:
    """Whether this process received a stop signal."""
    return self._requested

  def should_stop(self, step: int = 0, every: int = 1) -> bool:
    """Whether any process received a stop signal (all processes get the same answer).

    Call it at the same point of every step on every process. With several processes the
    flag is combined (an all-gather, which waits for the step to finish on every device) only
    when `step` is a multiple of `every`, so asynchronous dispatch is kept between checks;
    on one process the answer is immediate.
    """
    if jax.process_count() == 1:
      return self._requested
    if step % max(1, int(every)):
      return False
    flags = multihost_utils.process_allgather(np.asarray(int(self._requested), np.int32))
    return bool(np.max(flags))
