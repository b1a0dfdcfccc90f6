"""Config variants are valid; bad values fail naming the key."""

import os
import pathlib
import subprocess
import sys

import pytest

from configs import gc
from mr2ct_jax import config_checks


@pytest.mark.parametrize('variant', gc.VARIANTS)
def test_variants_validate(variant):
  config_checks.validate(gc.get_config(variant), num_devices=1)


def test_paper_defaults():
  config = gc.get_config()
  # The preprocessing comes from the dataset; prepare and the phantom use the paper's values.
  for key in ('image_size', 'spacing_mm', 'mr_percentile', 'n4', 'plane'):
    assert config.data[key] is None, key
  defaults = config.data.prepare_defaults
  assert (defaults.image_size, defaults.spacing_mm, defaults.mr_percentile, defaults.n4,
          defaults.plane) == (256, 1.25, 99.5, False, 'axial')
  assert config.train.batch_size == 1
  assert config.train.num_steps == 200_000
  assert config.loss.cycle_weight == 3.0
  assert config.loss.gc_weight == 0.3
  assert config.loss.identity_weight == 0.0
  assert config.loss.gc_signed is False
  assert config.optim.lr == 2e-4 and config.optim.b1 == 0.5
  assert config.optim.decay_start_fraction == 0.5
  assert tuple(config.data.ct_window) == (-150.0, 350.0)
  assert tuple(config.data.mr_window) == (0.0, 100.0)
  assert config.model.num_res_blocks == 9 and config.model.num_disc_layers == 3
  assert config.model.disc_norm == 'instance'
  assert gc.get_config('nogc').loss.gc_weight == 0.0


def test_quick_weakens_the_cycle_term_and_the_cpu_small_study_keeps_the_papers():
  from mr2ct_jax.experiments import presets  # pylint: disable=g-import-not-at-top
  assert gc.get_config('quick').loss.cycle_weight == 1.0
  study = presets.cell_config(presets.get_preset('cpu_small'), presets.BY_NAME['gc_large'], '/d')
  assert study.loss.cycle_weight == gc.get_config().loss.cycle_weight == 3.0
  assert study.train.ema_decay == gc.get_config('quick').train.ema_decay


def test_quick_trains_on_96_px_and_the_cpu_small_study_keeps_its_64_px_grid():
  from mr2ct_jax.experiments import presets  # pylint: disable=g-import-not-at-top
  from mr2ct_jax.data import writer  # pylint: disable=g-import-not-at-top
  quick = gc.get_config('quick')
  assert writer.preparation_settings(quick)['image_size'] == 96
  assert writer.preparation_settings(quick)['spacing_mm'] == pytest.approx(320 / 96)
  assert quick.train.batch_size == 2
  study = presets.cell_config(presets.get_preset('cpu_small'), presets.BY_NAME['gc_large'], '/d')
  settings = writer.preparation_settings(study)
  assert (settings['image_size'], settings['spacing_mm'], study.train.batch_size) == (64, 5.0, 4)
  # The mirror average: quick's sCT, not the paper's, nor the study's (measured without it).
  assert quick.eval.flip_average and not gc.get_config().eval.flip_average
  assert not study.eval.flip_average


def test_unknown_variant():
  with pytest.raises(ValueError, match='unknown variant'):
    gc.get_config('bogus')


@pytest.mark.parametrize('key, value, message', [
    ('loss.gc_weight', -0.3, 'config.loss.gc_weight=-0.3'),
    ('loss.cycle_weight', -1.0, 'config.loss.cycle_weight'),
    ('data.image_size', 30, 'config.data.image_size=30: must be >= 16 and divisible by 4'),
    ('data.spacing_mm', 0.0, 'config.data.spacing_mm'),
    ('data.ct_window', (350.0, -150.0), 'config.data.ct_window'),
    ('optim.lr', 0.0, 'config.optim.lr'),
    ('train.num_steps', 0, 'config.train.num_steps'),
    ('model.dtype', 'float64', 'config.model.dtype'),
    ('model.conv_impl', 'cudnn', 'config.model.conv_impl'),
    ('model.disc_norm', 'batch', "config.model.disc_norm='batch': must be one of"),
])
def test_bad_values_name_the_key(key, value, message):
  config = gc.get_config('test')
  section, name = key.split('.')
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=message.replace('(', r'\(')):
    config_checks.validate(config)


def test_batch_must_divide_over_devices():
  config = gc.get_config('test')
  config.train.batch_size = 6
  with pytest.raises(config_checks.ConfigError,
                     match=r'config.train.batch_size=6: must be divisible by the number of '
                           r'devices \(8\)'):
    config_checks.validate(config, num_devices=8)


def test_unknown_key_rejected_by_locked_config():
  config = gc.get_config('test')
  config.lock()
  with pytest.raises(AttributeError):
    config.loss.gc_wieght = 0.1


_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'gc.py')


@pytest.mark.parametrize('args, message', [
    ([f'--config={_CONFIG}:test', '--config.data.nonexist=1'],
     "error: --config.data.nonexist: the config has no field 'nonexist'"),
    (['--config=/nonexistent/gc.py'], "error: --config: .*No such file or directory"),
    ([f'--config={_CONFIG}:bogus'], "error: --config: .*unknown variant 'bogus'"),
    ([f'--config={_CONFIG}:test', '--config.data.spacing_mm=0'],
     'error: config.data.spacing_mm=0.0: must be > 0'),
    ([f'--config={_CONFIG}:test', '--config.data.image_size=30'],
     'error: config.data.image_size=30: must be >= 16 and divisible by 4'),
])
def test_prepare_rejects_bad_config_flags_in_one_line(tmp_path, monkeypatch, args, message):
  from mr2ct_jax.data import prepare
  out = tmp_path / 'data'
  # ml_collections finds --config.X overrides in sys.argv, so the command line goes there.
  monkeypatch.setattr(sys, 'argv', ['prepare', *args, f'--mr_dir={tmp_path}',
                                    f'--ct_dir={tmp_path}', f'--out={out}'])
  with pytest.raises(SystemExit, match=message) as exc:
    prepare.main()
  assert '\n' not in str(exc.value.code)
  assert not out.exists()


def test_main_rejects_an_unknown_config_field_in_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'mr2ct_jax.main', f'--config={_CONFIG}:test',
       f'--workdir={tmp_path / "run"}', '--config.train.nonexist=1'],
      capture_output=True, encoding='utf-8', timeout=300,
      env={**os.environ, 'PYTHONPATH': str(pathlib.Path(_CONFIG).parents[1])})
  assert result.returncode == 1
  assert result.stderr.strip() == ("error: --config.train.nonexist: the config has no field "
                                   "'nonexist'")
  assert not (tmp_path / 'run').exists()


def test_a_config_file_that_raises_is_one_line(tmp_path, monkeypatch):
  from mr2ct_jax.data import prepare
  bad = tmp_path / 'bad_config.py'
  bad.write_text('def get_config(arg=None):\n  return 1 / 0\n', encoding='utf-8')
  monkeypatch.setattr(sys, 'argv', ['prepare', f'--config={bad}', f'--mr_dir={tmp_path}',
                                    f'--ct_dir={tmp_path}', f'--out={tmp_path / "data"}'])
  with pytest.raises(SystemExit, match='error: --config: ZeroDivisionError: division by zero'):
    prepare.main()
