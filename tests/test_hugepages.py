"""The CLIs' re-execution with glibc's transparent-huge-page malloc tunable."""

import os
import pathlib
import subprocess
import sys

import pytest

from mr2ct_jax.cli import hugepages

REPO = pathlib.Path(__file__).resolve().parents[1]
_PRINT_AFTER_REEXEC = ('from mr2ct_jax.cli import hugepages; import os; '
                       'hugepages.reexec_with_hugepages(); '
                       'print(os.environ.get("GLIBC_TUNABLES"), os.environ.get("MR2CT_JAX_HUGEPAGES"))')


def _clean_env(**extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ('GLIBC_TUNABLES', hugepages.ENV_VAR)}
  return {**env, 'PYTHONPATH': str(REPO), **extra}


def _run_child(env):
  result = subprocess.run([sys.executable, '-c', _PRINT_AFTER_REEXEC], cwd=REPO, env=env,
                          capture_output=True, encoding='utf-8', timeout=120, check=True)
  return result.stdout.split()


def test_tunables_keep_the_users_settings():
  assert hugepages.tunables_with_hugetlb(None) == 'glibc.malloc.hugetlb=1'
  assert hugepages.tunables_with_hugetlb('') == 'glibc.malloc.hugetlb=1'
  assert (hugepages.tunables_with_hugetlb('glibc.malloc.arena_max=2') ==
          'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  # A hugetlb choice of the user's own (e.g. 0, or 2 for reserved huge pages) is kept.
  assert hugepages.tunables_with_hugetlb('glibc.malloc.hugetlb=0') is None


def test_not_wanted_when_the_user_opted_out_or_chose_a_hugetlb_setting():
  assert not hugepages.wanted({hugepages.ENV_VAR: '0'})
  assert not hugepages.wanted({hugepages.ENV_VAR: '1'})  # already re-executed
  assert not hugepages.wanted({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})


@pytest.mark.parametrize('setting, offered', [
    ('always [madvise] never\n', True), ('[always] madvise never\n', True),
    ('always madvise [never]\n', False)])
def test_kernel_setting_is_read(tmp_path, setting, offered):
  path = tmp_path / 'enabled'
  path.write_text(setting, encoding='ascii')
  assert hugepages._kernel_offers_thp(str(path)) is offered
  assert hugepages._kernel_offers_thp(str(tmp_path / 'missing')) is False


def test_reexec_sets_the_tunable_once_where_the_system_supports_it():
  applicable = (sys.platform == 'linux' and hugepages._glibc_supports_hugetlb() and
                hugepages._kernel_offers_thp())
  expected = ['glibc.malloc.hugetlb=1', '1'] if applicable else ['None', 'None']
  assert _run_child(_clean_env()) == expected
  if applicable:
    assert (_run_child(_clean_env(GLIBC_TUNABLES='glibc.malloc.arena_max=2')) ==
            ['glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', '1'])


def test_reexec_respects_the_opt_out():
  assert _run_child(_clean_env(MR2CT_JAX_HUGEPAGES='0')) == ['None', '0']


def test_children_can_get_the_users_environment_back():
  reexeced = {'PATH': '/bin', hugepages.ENV_VAR: '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert hugepages.environ_without_reexec(reexeced) == {'PATH': '/bin'}
  kept = {hugepages.ENV_VAR: '1',
          'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'}
  assert hugepages.environ_without_reexec(kept) == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}
  # Not re-executed (or opted out): the environment is the user's already.
  own = {hugepages.ENV_VAR: '0', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert hugepages.environ_without_reexec(own) == own


def test_a_failed_reexec_runs_on_without_the_tunable(monkeypatch):
  def refuse(*args):
    raise OSError('exec refused')
  monkeypatch.setattr(hugepages, 'wanted', lambda: True)
  monkeypatch.setattr(hugepages.os, 'execve', refuse)
  monkeypatch.delenv('GLIBC_TUNABLES', raising=False)
  hugepages.reexec_with_hugepages()  # returns instead of raising
  assert 'GLIBC_TUNABLES' not in os.environ
