"""Replacing an output folder (`atomic.replace_dir`) and cleaning up after a failed run
(`atomic.removed_if_left_empty`): signals wait for the two renames, a failed rename never
loses the old output, and only folders the run created are removed."""

import os
import signal

import pytest

from mr2ct_jax import atomic


class _Stopped(Exception):
  pass


def _old_and_new(tmp_path):
  """(target folder holding old.txt, a completed folder holding new.txt)."""
  target, completed = tmp_path / 'out', tmp_path / '.out.tmp-1'
  target.mkdir()
  (target / 'old.txt').write_text('old', encoding='utf-8')
  completed.mkdir()
  (completed / 'new.txt').write_text('new', encoding='utf-8')
  return target, completed


def test_a_sigterm_between_the_two_renames_waits_for_both(tmp_path, monkeypatch):
  """SIGTERM right after the old output is moved aside is handled once the new one is in
  place and the old one deleted, not in between (where only a hidden sibling held it)."""
  target, completed = _old_and_new(tmp_path)
  real_replace, calls = os.replace, []

  def replace_then_signal(src, dst):
    real_replace(src, dst)
    calls.append(dst)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)

  def stop(signum, frame):
    raise _Stopped(f'handled after {len(calls)} renames')

  monkeypatch.setattr(os, 'replace', replace_then_signal)
  previous = signal.signal(signal.SIGTERM, stop)
  try:
    with pytest.raises(_Stopped, match='after 2 renames'):
      atomic.replace_dir(str(completed), str(target))
    assert signal.getsignal(signal.SIGTERM) is stop  # the handler is back in place
  finally:
    signal.signal(signal.SIGTERM, previous)
  assert os.listdir(tmp_path) == ['out'] and os.listdir(target) == ['new.txt']


def test_a_failed_second_rename_puts_the_old_output_back(tmp_path, monkeypatch):
  target, completed = _old_and_new(tmp_path)
  real_replace = os.replace

  def fail_onto_target(src, dst):
    if os.fspath(dst) == str(target) and os.fspath(src) == str(completed):
      raise OSError(28, 'No space left on device')
    real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', fail_onto_target)
  with pytest.raises(OSError, match='No space'):
    atomic.replace_dir(str(completed), str(target))
  assert sorted(os.listdir(tmp_path)) == ['.out.tmp-1', 'out']
  assert os.listdir(target) == ['old.txt']


def test_a_failed_restore_names_where_the_old_output_is_kept(tmp_path, monkeypatch):
  target, completed = _old_and_new(tmp_path)
  real_replace = os.replace

  def full_disk_after_the_first(src, dst):
    if os.fspath(src) != str(target):  # the old output moves aside; nothing else works
      raise OSError(28, 'No space left on device')
    real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', full_disk_after_the_first)
  with pytest.raises(OSError, match=r'No space left on device; the previous contents of '
                                    r'.*out are kept in .*\.out\.old-.*previous') as info:
    atomic.replace_dir(str(completed), str(target))
  kept = info.value.strerror.rsplit(' ', 1)[-1]
  assert os.listdir(kept) == ['old.txt']


def test_signals_held_back_are_all_delivered_even_when_one_raises():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.raises(KeyboardInterrupt):
      with atomic._signals_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert not seen  # held back inside the block
    assert seen == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)
    signal.signal(signal.SIGINT, previous_int)


def test_a_failed_run_removes_only_the_folders_it_created(tmp_path):
  (tmp_path / 'a' / 'c').mkdir(parents=True)  # the user's empty folder
  with pytest.raises(ValueError):
    with atomic.removed_if_left_empty(str(tmp_path / 'a' / 'b' / '..' / 'c')):
      raise ValueError('bad input')
  assert (tmp_path / 'a' / 'c').is_dir()  # 'a/b/../c' is 'a/c', which existed
  with pytest.raises(ValueError):
    with atomic.removed_if_left_empty(str(tmp_path / 'runs' / 'x' / 'work')):
      os.makedirs(tmp_path / 'runs' / 'x' / 'work')
      raise ValueError('bad input')
  assert sorted(os.listdir(tmp_path)) == ['a']  # runs/x/work and the parents it needed
  with pytest.raises(ValueError):
    with atomic.removed_if_left_empty(str(tmp_path / 'runs' / 'work')):
      os.makedirs(tmp_path / 'runs' / 'work')
      (tmp_path / 'runs' / 'work' / 'phantom').write_text('built', encoding='utf-8')
      raise ValueError('later failure')
  assert (tmp_path / 'runs' / 'work' / 'phantom').is_file()  # something was written: kept
